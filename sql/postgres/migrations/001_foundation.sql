-- lungsql schema, version 1: patients, their DICOM scans, labels, and the
-- record of what an upload could not store.
--
-- Applied once by `lungsql init` inside a transaction; see lungsql/migrations.py.

CREATE EXTENSION IF NOT EXISTS plpython3u;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- Runtime settings the stored procedures read, e.g. where the Python
-- environment of lungsql lives ('python.path').
CREATE TABLE lungsql.settings (
    name        text PRIMARY KEY,
    value       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE lungsql.patients (
    patient_id  text PRIMARY KEY CHECK (patient_id <> ''),
    name        text,                       -- PatientName as 'Given Family'; NULL when de-identified
    sex         text CHECK (sex IN ('M', 'F', 'O')),
    birth_date  date,
    age_years   real CHECK (age_years >= 0 AND age_years < 150),
    label       smallint CHECK (label IN (0, 1)),   -- 1 = cancer, when known (from lungsql.labels)
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Case-insensitive substring search on names ('ana' finds 'Ana Fernandez').
CREATE INDEX patients_name_trgm ON lungsql.patients USING gin (lower(name) gin_trgm_ops);

-- One row per DICOM instance (a CT slice), with the file's bytes unchanged.
CREATE TABLE lungsql.scans (
    scan_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sop_instance_uid    text NOT NULL UNIQUE,
    patient_id          text NOT NULL REFERENCES lungsql.patients ON DELETE CASCADE,
    study_instance_uid  text NOT NULL,
    series_instance_uid text NOT NULL,
    instance_number     integer,
    z_position          double precision NOT NULL,   -- ImagePositionPatient[2], mm
    rows                integer NOT NULL CHECK (rows > 0),
    columns             integer NOT NULL CHECK (columns > 0),
    pixel_spacing_row   double precision,            -- PixelSpacing[0], mm
    pixel_spacing_col   double precision,            -- PixelSpacing[1], mm
    slice_thickness     double precision,
    rescale_slope       double precision NOT NULL DEFAULT 1,
    rescale_intercept   double precision NOT NULL DEFAULT 0,
    modality            text NOT NULL,
    transfer_syntax_uid text NOT NULL,
    dicom               bytea NOT NULL,
    sha256              bytea NOT NULL CHECK (length(sha256) = 32),
    ingested_at         timestamptz NOT NULL DEFAULT now()
);
-- lz4 is 3x faster than the default pglz on CT pixels and saves ~30 %.
ALTER TABLE lungsql.scans ALTER COLUMN dicom SET COMPRESSION lz4;

-- A patient's slices in z order, series by series: what featurization reads.
CREATE INDEX scans_patient_series_z ON lungsql.scans (patient_id, series_instance_uid, z_position);

-- Labels as they were loaded (e.g. from stage1_labels.csv), also for patients
-- whose scans have not arrived yet; patients.label holds the latest one.
CREATE TABLE lungsql.labels (
    patient_id  text PRIMARY KEY,
    cancer      smallint NOT NULL CHECK (cancer IN (0, 1)),
    source      text NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per upload run.
CREATE TABLE lungsql.ingest_runs (
    run_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_dir  text NOT NULL,
    deidentify  boolean NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    files_seen  integer NOT NULL DEFAULT 0,
    stored      integer NOT NULL DEFAULT 0,
    skipped     integer NOT NULL DEFAULT 0,
    errors      integer NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    seconds     double precision
);

-- Files an upload could not store, with a one-line reason. A file that fails
-- again on a later run updates its row instead of adding one.
CREATE TABLE lungsql.ingest_errors (
    error_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_path text NOT NULL,
    reason      text NOT NULL,
    run_id      bigint REFERENCES lungsql.ingest_runs ON DELETE SET NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_path, reason)
);
