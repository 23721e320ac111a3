-- lungsql schema, version 9: a second imaging task. Chest radiographs (DICOM CR/DX,
-- or the PNG files of the NIH ChestX-ray14 download) with any of its 14 findings,
-- featurized image by image, one LightGBM booster per finding, scored per image.
-- Lung cancer on CT keeps its tables; what both tasks share (patients, CNNs, runs,
-- the registry) says which task a row belongs to.

-- The tasks and, for a multi-label task, its findings in their order.
CREATE TABLE lungsql.tasks (
    task         text PRIMARY KEY,
    study_shape  text NOT NULL CHECK (study_shape IN ('volume', 'image')),
    labels       text NOT NULL CHECK (labels IN ('binary', 'multi_label')),
    description  text NOT NULL
);
INSERT INTO lungsql.tasks VALUES
    ('lung_cancer', 'volume', 'binary', 'lung cancer from a CT series (Kaggle DSB 2017)'),
    ('chest_xray14', 'image', 'multi_label', 'the 14 findings of NIH ChestX-ray14 on a frontal chest radiograph');

CREATE TABLE lungsql.findings (
    task      text NOT NULL REFERENCES lungsql.tasks,
    finding   text NOT NULL,
    position  smallint NOT NULL,
    PRIMARY KEY (task, finding),
    UNIQUE (task, position)
);
INSERT INTO lungsql.findings (task, finding, position)
SELECT 'chest_xray14', f, n FROM unnest(ARRAY['Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Effusion',
    'Emphysema', 'Fibrosis', 'Hernia', 'Infiltration', 'Mass', 'Nodule', 'Pleural_Thickening', 'Pneumonia',
    'Pneumothorax']) WITH ORDINALITY AS t(f, n);

ALTER TABLE lungsql.models ADD COLUMN task text NOT NULL DEFAULT 'lung_cancer' REFERENCES lungsql.tasks;
ALTER TABLE lungsql.feature_runs ADD COLUMN task text NOT NULL DEFAULT 'lung_cancer' REFERENCES lungsql.tasks;

-- One row per radiograph, the file's bytes unchanged (a PNG or a DICOM file).
CREATE TABLE lungsql.radiographs (
    image_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    image_index         text NOT NULL UNIQUE CHECK (image_index <> ''),  -- the PNG's name, or the SOPInstanceUID
    patient_id          text NOT NULL REFERENCES lungsql.patients ON DELETE CASCADE,
    format              text NOT NULL CHECK (format IN ('png', 'dicom')),
    data                bytea NOT NULL,
    sha256              bytea NOT NULL CHECK (length(sha256) = 32),
    rows                integer NOT NULL CHECK (rows > 0),
    columns             integer NOT NULL CHECK (columns > 0),
    bits_stored         smallint NOT NULL CHECK (bits_stored BETWEEN 1 AND 16),
    photometric         text NOT NULL,
    modality            text,
    view_position       text,
    pixel_spacing_mm    double precision CHECK (pixel_spacing_mm > 0),
    follow_up           integer CHECK (follow_up >= 0),
    study_instance_uid  text,
    series_instance_uid text,
    transfer_syntax_uid text,
    run_id              bigint REFERENCES lungsql.ingest_runs ON DELETE SET NULL,
    ingested_at         timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE lungsql.radiographs ALTER COLUMN data SET STORAGE EXTERNAL;  -- PNG and compressed DICOM are dense
CREATE INDEX radiographs_patient ON lungsql.radiographs (patient_id);

-- The findings of each image, as a labels file gives them; loaded for every row
-- of the file, also for images not uploaded (yet). An empty array is 'No Finding'.
-- split: the official list the image is on (train_val_list.txt, test_list.txt).
CREATE TABLE lungsql.image_labels (
    image_index  text PRIMARY KEY,
    patient_id   text NOT NULL,
    task         text NOT NULL DEFAULT 'chest_xray14' REFERENCES lungsql.tasks,
    findings     text[] NOT NULL CHECK (findings <@ ARRAY['Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema',
                     'Effusion', 'Emphysema', 'Fibrosis', 'Hernia', 'Infiltration', 'Mass', 'Nodule',
                     'Pleural_Thickening', 'Pneumonia', 'Pneumothorax']),
    split        text CHECK (split IN ('train_val', 'test')),
    follow_up    integer,
    age_years    real,
    sex          text,
    view_position text,
    source       text NOT NULL,
    loaded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX image_labels_patient ON lungsql.image_labels (patient_id);

-- CNN features of one radiograph: dim float32 (little endian).
CREATE TABLE lungsql.image_features (
    image_id    bigint NOT NULL REFERENCES lungsql.radiographs ON DELETE CASCADE,
    cnn_id      integer NOT NULL REFERENCES lungsql.cnn_models ON DELETE CASCADE,
    dim         integer NOT NULL CHECK (dim > 0),
    data        bytea NOT NULL CHECK (length(data) = 4 * dim),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    run_id      bigint REFERENCES lungsql.feature_runs ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_id, cnn_id)
);

-- Radiographs a run could not featurize, and why; left out until retried.
CREATE TABLE lungsql.image_feature_failures (
    image_id    bigint NOT NULL REFERENCES lungsql.radiographs ON DELETE CASCADE,
    cnn_id      integer NOT NULL REFERENCES lungsql.cnn_models ON DELETE CASCADE,
    run_id      bigint REFERENCES lungsql.feature_runs ON DELETE SET NULL,
    reason      text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_id, cnn_id)
);

-- A multi-label model's boosters, one per finding, each LightGBM text with its
-- SHA-256. lungsql.models.model_text holds the manifest (the findings and their
-- boosters' SHA-256, JSON) and models.sha256 the manifest's.
CREATE TABLE lungsql.model_boosters (
    model_id    integer NOT NULL REFERENCES lungsql.models ON DELETE CASCADE,
    finding     text NOT NULL,
    model_text  text NOT NULL,
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    PRIMARY KEY (model_id, finding)
);

-- Every probability of a finding the scoring functions returned.
CREATE TABLE lungsql.finding_predictions (
    prediction_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    image_id       bigint NOT NULL REFERENCES lungsql.radiographs ON DELETE CASCADE,
    model_id       integer NOT NULL REFERENCES lungsql.models ON DELETE CASCADE,
    finding        text NOT NULL,
    probability    double precision NOT NULL CHECK (probability BETWEEN 0 AND 1),
    predicted_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX finding_predictions_image ON lungsql.finding_predictions (image_id, predicted_at DESC);

-- generate_features gained task: the old signature would be an ambiguous overload of the new one.
DROP PROCEDURE IF EXISTS lungsql.generate_features(text, boolean, integer, integer, boolean);
