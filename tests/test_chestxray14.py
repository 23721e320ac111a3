"""The NIH ChestX-ray14 download (lungsql.dicom.chestxray14): its labels file as the real one is written and
as later copies are, its split lists, and the two ways its images lie on disk."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from lungsql.dicom.chestxray14 import (FINDINGS, NO_FINDING, ImageLabel, Layout, SuspectValueWarning, find_layout,
                                       read_data_entry, read_split_lists)
from lungsql.errors import ConfigurationError

#: The header of the real Data_Entry_2017.csv: bracketed names split at their commas, a trailing empty column.
REAL_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
REAL_ROWS = ("00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
             "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
             "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,")
EXPECTED = [
    ImageLabel("00000001_000.png", "1", ("Cardiomegaly",), 0, 58.0, "M", "PA", 2682, 2749, 0.143),
    ImageLabel("00000001_001.png", "1", ("Cardiomegaly", "Emphysema"), 1, 58.0, "M", "PA", 2894, 2729, 0.143),
    ImageLabel("00000002_000.png", "2", (), 0, 81.0, "M", "PA", 2500, 2048, 0.171),
]


def write(path: Path, lines, newline: str = "\n", bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode() + newline.encode())
    return path


def test_the_findings_are_the_fourteen_of_chestxray14():
    assert len(FINDINGS) == 14 and list(FINDINGS) == sorted(FINDINGS)
    assert "Pleural_Thickening" in FINDINGS and NO_FINDING == "No Finding" and NO_FINDING not in FINDINGS


def test_the_real_file_with_its_split_header_and_trailing_empty_column(tmp_path):
    labels = read_data_entry(write(tmp_path / "Data_Entry_2017.csv", (REAL_HEADER, *REAL_ROWS)))
    assert labels == EXPECTED
    assert all(label.split is None for label in labels)


def test_a_bom_and_crlf_line_ends_change_nothing(tmp_path):
    path = write(tmp_path / "Data_Entry_2017.csv", (REAL_HEADER, *REAL_ROWS), newline="\r\n", bom=True)
    assert read_data_entry(str(path)) == EXPECTED


def test_the_v2020_copy_without_the_trailing_column_and_other_column_names(tmp_path):
    v2020 = write(tmp_path / "Data_Entry_2017_v2020.csv", (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]",
        *(row[:-1] for row in REAL_ROWS)))
    assert read_data_entry(v2020) == EXPECTED
    # Columns in another order, named without brackets, an ID with leading zeros and an age as DICOM writes one.
    renamed = write(tmp_path / "renamed.csv", (
        "Patient ID,Image Index,Finding Labels,Patient Age,Patient Gender,View Position,Follow-up #,"
        "OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y",
        "00001,00000001_000.png,Cardiomegaly,058Y,M,PA,0,2682,2749,0.143,0.143"))
    assert read_data_entry(renamed) == EXPECTED[:1]


def test_ages_as_dicom_writes_them_and_without_demographics(tmp_path):
    labels = read_data_entry(write(tmp_path / "d.csv", (
        "Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position",
        "00000003_000.png,Hernia,3,058Y,F,AP",
        "00000004_000.png,Pleural_Thickening|Mass|Nodule,00004,006M,,",
        "00000005_000.png,No Finding,5,,X,")))
    assert [label.age_years for label in labels] == [58.0, 0.5, None]
    assert [label.sex for label in labels] == ["F", None, None]
    assert [label.view_position for label in labels] == ["AP", None, None]
    assert labels[1].findings == ("Mass", "Nodule", "Pleural_Thickening") and labels[1].patient_id == "4"
    assert labels[2].follow_up is None and labels[2].original_width is None and labels[2].original_spacing_mm is None


def test_an_age_above_150_is_unknown_and_counted(tmp_path):
    path = write(tmp_path / "Data_Entry_2017.csv", (
        REAL_HEADER, *REAL_ROWS,
        "00000006_000.png,Edema,0,6,412,F,AP,2048,2500,0.168,0.168,",
        "00000007_000.png,Edema,0,7,155,F,AP,2048,2500,0.168,0.168,"))
    with pytest.warns(SuspectValueWarning, match=r"2 ages outside 0 to 150 years .*line 5: '412', line 6: '155'"):
        labels = read_data_entry(path)
    assert [label.age_years for label in labels] == [58.0, 58.0, 81.0, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file warns of nothing
        read_data_entry(write(tmp_path / "clean.csv", (REAL_HEADER, *REAL_ROWS)))


def test_an_unknown_label_names_the_line_and_the_value(tmp_path):
    path = write(tmp_path / "Data_Entry_2017.csv", (
        REAL_HEADER, REAL_ROWS[0], "00000001_001.png,Cardiomegaly|Emphysemia,1,1,58,M,PA,2894,2729,0.143,0.143,"))
    with pytest.raises(ConfigurationError) as error:
        read_data_entry(path)
    assert str(path) in error.value.message and "line 3" in error.value.message
    assert "'Emphysemia'" in error.value.message and "'Cardiomegaly|Emphysemia'" in error.value.message
    assert "Emphysema" in error.value.hint and NO_FINDING in error.value.hint


@pytest.mark.parametrize("row, expected", [
    (",Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,", "line 2: no Image Index"),
    ("00000001_000.png,Cardiomegaly,0,,58,M,PA,2682,2749,0.143,0.143,", "line 2: no Patient ID"),
    ("00000001_000.png,No Finding|Mass,0,1,58,M,PA,2682,2749,0.143,0.143,", "'No Finding' together with findings"),
    ("00000001_000.png,,0,1,58,M,PA,2682,2749,0.143,0.143,", "no finding label"),
    ("00000001_000.png,Mass,0,1,fifty,M,PA,2682,2749,0.143,0.143,", "Patient Age is 'fifty', not a number"),
    ("00000001_000.png,Mass,-1,1,58,M,PA,2682,2749,0.143,0.143,", "Follow-up # is -1, below 0"),
    ("00000001_000.png,Mass,0,1,58,M,PA,2682,2749,0.143,0.143,,extra", "13 values where the header names 12"),
])
def test_a_row_that_cannot_be_read_names_its_line(tmp_path, row, expected):
    with pytest.raises(ConfigurationError, match="line 2") as error:
        read_data_entry(write(tmp_path / "d.csv", (REAL_HEADER, row)))
    assert expected in error.value.message and error.value.hint


def test_the_same_image_twice_is_an_error(tmp_path):
    with pytest.raises(ConfigurationError, match="line 3: image '00000001_000.png' is on line 2 too"):
        read_data_entry(write(tmp_path / "d.csv", (REAL_HEADER, REAL_ROWS[0], REAL_ROWS[0])))


def test_a_file_that_is_not_the_labels_file_is_an_error(tmp_path):
    with pytest.raises(ConfigurationError, match="no column 'Finding Labels'"):
        read_data_entry(write(tmp_path / "d.csv", ("Image Index,Patient ID", "00000001_000.png,1")))
    with pytest.raises(ConfigurationError, match="is empty"):
        read_data_entry(write(tmp_path / "empty.csv", ()))
    with pytest.raises(ConfigurationError, match="cannot read the labels file"):
        read_data_entry(tmp_path / "missing.csv")
    (tmp_path / "latin1.csv").write_bytes("Image Index,Finding Labels,Patient ID\n\xe9,Mass,1\n".encode("latin-1"))
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        read_data_entry(tmp_path / "latin1.csv")


def test_the_split_lists(tmp_path):
    assert read_split_lists(tmp_path) == {}
    write(tmp_path / "train_val_list.txt", ("00000001_000.png", "00000001_001.png", ""))
    assert read_split_lists(tmp_path) == {"00000001_000.png": "train_val", "00000001_001.png": "train_val"}
    write(tmp_path / "test_list.txt", ("00000002_000.png",), newline="\r\n")
    splits = read_split_lists(tmp_path)
    assert splits == {"00000001_000.png": "train_val", "00000001_001.png": "train_val",
                      "00000002_000.png": "test"}
    from dataclasses import replace

    labels = read_data_entry(write(tmp_path / "Data_Entry_2017.csv", (REAL_HEADER, *REAL_ROWS)))
    assert [replace(label, split=splits.get(label.image_index)).split for label in labels] == \
        ["train_val", "train_val", "test"]


def test_an_image_on_both_split_lists_is_an_error(tmp_path):
    write(tmp_path / "train_val_list.txt", ("00000001_000.png", "00000002_000.png"))
    write(tmp_path / "test_list.txt", ("00000003_000.png", "00000002_000.png"))
    with pytest.raises(ConfigurationError) as error:
        read_split_lists(tmp_path)
    message = error.value.message
    assert "'00000002_000.png' is on two split lists" in message
    assert "train_val_list.txt (line 2)" in message and "test_list.txt (line 2)" in message


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_find_layout_with_one_images_folder(tmp_path):
    csv = write(tmp_path / "Data_Entry_2017.csv", (REAL_HEADER, *REAL_ROWS))
    images = [touch(tmp_path / "images" / name) for name in ("00000002_000.png", "00000001_000.png")]
    touch(tmp_path / "images" / "README.txt")
    write(tmp_path / "test_list.txt", ("00000002_000.png",))
    layout = find_layout(tmp_path)
    assert isinstance(layout, Layout)
    assert layout.root == tmp_path and layout.csv == csv
    assert layout.images == tuple(sorted(images))
    assert layout.split_lists == (tmp_path / "test_list.txt",)


def test_find_layout_with_the_twelve_unpacked_archives_and_the_v2020_labels(tmp_path):
    csv = write(tmp_path / "Data_Entry_2017_v2020.csv", (REAL_HEADER, *REAL_ROWS))
    first = touch(tmp_path / "images_001" / "images" / "00000001_000.png")
    second = touch(tmp_path / "images_001" / "images" / "00000001_001.png")
    last = touch(tmp_path / "images_012" / "images" / "00030805_000.png")
    (tmp_path / "images_002" / "images").mkdir(parents=True)  # an archive unpacked to nothing yet
    touch(tmp_path / "images_003.tar.gz")
    layout = find_layout(tmp_path)
    assert layout.csv == csv and layout.images == (first, second, last)
    assert layout.split_lists == ()
    # Both labels files: the 2020 one.
    write(tmp_path / "Data_Entry_2017.csv", (REAL_HEADER, *REAL_ROWS))
    assert find_layout(tmp_path).csv == csv


def test_find_layout_without_images_or_with_one_image_twice(tmp_path):
    write(tmp_path / "Data_Entry_2017.csv", (REAL_HEADER, *REAL_ROWS))
    assert find_layout(tmp_path).images == ()
    touch(tmp_path / "images_001" / "images" / "00000001_000.png")
    touch(tmp_path / "images_002" / "images" / "00000001_000.png")
    with pytest.raises(ConfigurationError, match="00000001_000.png is in both"):
        find_layout(tmp_path)


def test_find_layout_says_what_it_expected(tmp_path):
    touch(tmp_path / "images" / "00000001_000.png")
    with pytest.raises(ConfigurationError) as error:
        find_layout(tmp_path)
    assert "Data_Entry_2017.csv" in error.value.message and "images_001/images/" in error.value.hint
    with pytest.raises(ConfigurationError, match="is not a folder"):
        find_layout(tmp_path / "nowhere")
