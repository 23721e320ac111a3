"""The NIH ChestX-ray14 download: its labels file, its official split lists and where its images lie.

The download holds Data_Entry_2017.csv (one row per image: its findings,
follow-up number, patient, age, sex, view and the original size and pixel
spacing), train_val_list.txt and test_list.txt (the official split, by image
name), and the 112,120 images as 1024 x 1024 PNG files, packed in
images_001.tar.gz .. images_012.tar.gz, each of which unpacks to
images_NNN/images/*.png.

Data_Entry_2017.csv is read as the real file is written. Its header
    Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,
    OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
has the bracketed names split at their commas (columns 'OriginalImage[Width'
and 'Height]', 'OriginalImagePixelSpacing[x' and 'y]') and a trailing empty
column, which every row repeats; later copies (Data_Entry_2017_v2020.csv)
drop it, and some name the columns 'OriginalImageWidth' and so on. Columns
are found by name, whatever their order.

A wrong label or a row without an image or a patient is a ConfigurationError
naming the file, the line and the value. An age outside 0 to 150 years (the
real file has a few, such as 412: errors in the data) is read as unknown, and
one SuspectValueWarning counts them.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from lungsql.dicom.reader import parse_age
from lungsql.errors import ConfigurationError

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
            "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
NO_FINDING = "No Finding"
#: The labels file's names, the newest first: find_layout takes the first one present.
DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_LISTS = (("train_val", "train_val_list.txt"), ("test", "test_list.txt"))
AGE_RANGE = (0.0, 150.0)

_FINDING_BY_KEY = {f.lower(): f for f in FINDINGS}
# A column's name lower-cased without anything but letters and digits -> the field it holds.
_COLUMNS = {
    "imageindex": "image_index",
    "findinglabels": "findings",
    "followup": "follow_up",
    "patientid": "patient_id",
    "patientage": "age",
    "patientgender": "sex",
    "patientsex": "sex",
    "viewposition": "view_position",
    "originalimagewidth": "width",
    "height": "height",  # 'Height]': the second half of 'OriginalImage[Width,Height]'
    "originalimageheight": "height",
    "originalimagepixelspacingx": "spacing_x",
    "x": "spacing_x",
    "originalimagepixelspacingy": "spacing_y",
    "y": "spacing_y",  # 'y]': the second half of 'OriginalImagePixelSpacing[x,y]'
}
_REQUIRED = ("image_index", "findings", "patient_id")
_DICOM_AGE = re.compile(r"^\d+[YMWD]$", re.IGNORECASE)


class SuspectValueWarning(UserWarning):
    """Values of a labels file read as unknown because they cannot be right (an age of 412 years)."""


@dataclass(frozen=True)
class ImageLabel:
    """One row of the labels file: an image's findings and what the file says of its patient."""

    image_index: str  # the PNG's name, '00000001_000.png'
    patient_id: str  # a whole number without leading zeros ('1'; see read_data_entry)
    findings: tuple[str, ...]  # a sorted subset of FINDINGS; empty for 'No Finding'
    follow_up: int | None
    age_years: float | None
    sex: str | None  # 'M' or 'F'
    view_position: str | None  # 'PA' or 'AP' in ChestX-ray14; another value is kept as written
    original_width: int | None  # of the image before NIH resized it to 1024 x 1024
    original_height: int | None
    original_spacing_mm: float | None  # its pixel spacing (x; y where x is missing)
    split: str | None = None  # 'train_val' or 'test' (read_split_lists), None when not known


@dataclass(frozen=True)
class Layout:
    """Where one ChestX-ray14 download lies: its labels file, its images (sorted by name), its split lists."""

    root: Path
    csv: Path
    images: tuple[Path, ...]
    split_lists: tuple[Path, ...] = ()


def read_data_entry(path: str | os.PathLike) -> list[ImageLabel]:
    """The rows of Data_Entry_2017.csv (or a copy of another version), in the file's order.

    The Patient ID is read as a whole number written without leading zeros:
    the 2017 file writes patient 1 as '1', other copies as '00001', and image
    names carry the same patient as eight digits ('00000001_000.png'), so one
    patient has one ID whichever copy is loaded. An ID that is not a number is
    kept as written. ConfigurationError names the line of a row that cannot
    be read and says what to fix."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return _read_rows(path, csv.reader(handle))
    except OSError as exc:
        raise ConfigurationError(f"cannot read the labels file {path}: {exc.strerror or exc}",
                                 hint="give the path of Data_Entry_2017.csv of the ChestX-ray14 download") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"the labels file {path} is not UTF-8 text",
                                 hint="give the path of Data_Entry_2017.csv of the ChestX-ray14 download") from None
    except csv.Error as exc:
        raise ConfigurationError(f"{path} is not a readable CSV file: {exc}",
                                 hint="give the path of Data_Entry_2017.csv of the ChestX-ray14 download") from None


def _read_rows(path: Path, reader) -> list[ImageLabel]:
    header = next(reader, None)
    while header is not None and not any(name.strip() for name in header):  # blank lines before the header
        header = next(reader, None)
    if header is None:
        raise ConfigurationError(f"the labels file {path} is empty",
                                 hint="give the path of Data_Entry_2017.csv of the ChestX-ray14 download")
    columns = _columns(path, header)
    labels: list[ImageLabel] = []
    first_line: dict[str, int] = {}
    bad_ages: list[tuple[int, str]] = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if any(cell.strip() for cell in row[len(header):]):
            raise ConfigurationError(f"{path}, line {line}: {len(row)} values where the header names "
                                     f"{len(header)} columns", hint="a value holds a comma: quote it, or fix the row")

        def value(field: str) -> str:
            index = columns.get(field)
            return row[index].strip() if index is not None and index < len(row) else ""

        image_index = value("image_index")
        if not image_index:
            raise ConfigurationError(f"{path}, line {line}: no Image Index",
                                     hint="every row names its image ('00000001_000.png'); fix or remove the row")
        if image_index in first_line:
            raise ConfigurationError(f"{path}, line {line}: image {image_index!r} is on line "
                                     f"{first_line[image_index]} too", hint="remove one of the two rows")
        first_line[image_index] = line
        patient_id = value("patient_id")
        if not patient_id:
            raise ConfigurationError(f"{path}, line {line}: no Patient ID for {image_index!r}",
                                     hint="every row names its patient; fix or remove the row")
        age_text = value("age")
        age = _age(path, line, age_text)
        if age is not None and not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
            bad_ages.append((line, age_text))
            age = None
        sex = value("sex").upper()[:1]
        spacing = _positive(_number(path, line, "OriginalImagePixelSpacing x", value("spacing_x"), float))
        if spacing is None:
            spacing = _positive(_number(path, line, "OriginalImagePixelSpacing y", value("spacing_y"), float))
        labels.append(ImageLabel(
            image_index=image_index,
            patient_id=str(int(patient_id)) if patient_id.isascii() and patient_id.isdigit() else patient_id,
            findings=_findings(path, line, value("findings")),
            follow_up=_number(path, line, "Follow-up #", value("follow_up"), int),
            age_years=age,
            sex=sex if sex in ("M", "F") else None,
            view_position=value("view_position").upper() or None,
            original_width=_number(path, line, "OriginalImage Width", value("width"), int) or None,
            original_height=_number(path, line, "OriginalImage Height", value("height"), int) or None,
            original_spacing_mm=spacing,
        ))
    if bad_ages:
        shown = ", ".join(f"line {line}: {text!r}" for line, text in bad_ages[:5])
        count = f"{len(bad_ages)} age{'s' if len(bad_ages) > 1 else ''}"
        warnings.warn(f"{path}: {count} outside {AGE_RANGE[0]:g} to {AGE_RANGE[1]:g} years read as unknown "
                      f"({shown}{', ...' if len(bad_ages) > 5 else ''})", SuspectValueWarning, stacklevel=3)
    return labels


def _columns(path: Path, header: list[str]) -> dict[str, int]:
    """The field of each column the header names; ConfigurationError when a needed one is missing."""
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        field = _COLUMNS.get(re.sub(r"[^a-z0-9]", "", name.lower()))
        if field is None:
            continue  # the trailing empty column, and columns lungsql does not read
        if field in columns:
            raise ConfigurationError(f"{path}: the header names {header[columns[field]]!r} and {name!r}, "
                                     "two columns for one value", hint="remove one of them")
        columns[field] = index
    missing = [name for field, name in zip(_REQUIRED, ("Image Index", "Finding Labels", "Patient ID"))
               if field not in columns]
    if missing:
        found = ", ".join(repr(h) for h in header if h.strip())
        raise ConfigurationError(f"{path}: no column {', '.join(repr(m) for m in missing)} in the header "
                                 f"({found or 'empty'})",
                                 hint="give the Data_Entry_2017.csv of the ChestX-ray14 download, whose header "
                                      "starts 'Image Index,Finding Labels,Follow-up #,Patient ID'")
    return columns


def _findings(path: Path, line: int, text: str) -> tuple[str, ...]:
    parts = [part.strip() for part in text.split("|")]
    if parts == [NO_FINDING]:
        return ()
    found = set()
    for part in parts:
        finding = _FINDING_BY_KEY.get(part.lower().replace(" ", "_"))
        if finding is None:
            what = ("'No Finding' together with findings" if part == NO_FINDING
                    else "no finding label" if not part else f"unknown finding {part!r}")
            raise ConfigurationError(
                f"{path}, line {line}: {what} in Finding Labels {text!r}",
                hint=f"the findings of ChestX-ray14 are {', '.join(FINDINGS)}, joined by '|', or "
                     f"'{NO_FINDING}' alone; correct the labels or remove the row")
        found.add(finding)
    return tuple(sorted(found))


def _age(path: Path, line: int, text: str) -> float | None:
    """Years, from '58' (the 2017 file), '58.5' or '058Y' / '006M' / '010W' / '003D' (some copies)."""
    if not text:
        return None
    if _DICOM_AGE.match(text):
        return parse_age(text)
    return _number(path, line, "Patient Age", text, float)


def _number(path: Path, line: int, column: str, text: str, kind: type):
    """A number of a column (a whole number >= 0 for kind int, a finite one for float); None when empty."""
    if not text:
        return None
    try:
        number = kind(text)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise ConfigurationError(f"{path}, line {line}: {column} is {text[:40]!r}, not a number",
                                 hint="the columns may be shifted: check the row's commas")
    if kind is int and number < 0:
        raise ConfigurationError(f"{path}, line {line}: {column} is {number}, below 0",
                                 hint="correct the value or remove the row")
    return number


def _positive(number: float | None) -> float | None:
    return number if number is not None and number > 0 else None


def read_split_lists(root: str | os.PathLike) -> dict[str, str]:
    """Image index -> 'train_val' or 'test', from root/train_val_list.txt and root/test_list.txt.

    Empty when neither file is there; ConfigurationError when an image is on both."""
    root = Path(root)
    splits: dict[str, str] = {}
    where: dict[str, tuple[Path, int]] = {}
    for split, name in SPLIT_LISTS:
        path = root / name
        if not path.is_file():
            continue
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read the split list {path}: {getattr(exc, 'strerror', None) or exc}",
                                     hint="restore it from the ChestX-ray14 download") from None
        for number, text in enumerate(lines, start=1):
            image = text.strip()
            if not image:
                continue
            if image in splits and splits[image] != split:
                other, other_line = where[image]
                raise ConfigurationError(f"image {image!r} is on two split lists: {other} (line {other_line}) "
                                         f"and {path} (line {number})",
                                         hint="an image is on one official list; restore the lists from the "
                                              "ChestX-ray14 download")
            splits[image] = split
            where.setdefault(image, (path, number))
    return splits


def find_layout(root: str | os.PathLike) -> Layout:
    """The labels file and the images of a ChestX-ray14 download at `root`.

    The images are root/images/*.png, or, as the download's twelve archives
    unpack, root/images_001/images/*.png .. root/images_012/images/*.png
    (both are looked in). The labels file is Data_Entry_2017_v2020.csv or
    Data_Entry_2017.csv (the 2020 one when both are there). No images is not
    an error: the labels can be loaded before the images."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigurationError(f"{root} is not a folder",
                                 hint="give the folder of the ChestX-ray14 download (it holds Data_Entry_2017.csv)")
    found = [root / name for name in DATA_ENTRY_NAMES if (root / name).is_file()]
    if not found:
        raise ConfigurationError(f"{root} holds no {' or '.join(DATA_ENTRY_NAMES[::-1])}",
                                 hint="give the folder of the ChestX-ray14 download: Data_Entry_2017.csv with "
                                      "images/ or images_001/images/ .. images_012/images/ beside it")
    folders = [root / "images"] + sorted(p / "images" for p in root.glob("images_[0-9][0-9][0-9]") if p.is_dir())
    images: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.lower().endswith(".png") or not entry.is_file():
                    continue
                if entry.name in images:
                    raise ConfigurationError(f"image {entry.name} is in both {images[entry.name].parent} and "
                                             f"{folder}", hint="an archive was unpacked twice: remove one copy")
                images[entry.name] = Path(entry.path)
    lists = tuple(root / name for _, name in SPLIT_LISTS if (root / name).is_file())
    return Layout(root, found[0], tuple(images[name] for name in sorted(images)), lists)
