-- lungsql schema, version 2: the CNN kept in a table, features per group of
-- slices, the LightGBM models with their registry, and predictions.
-- Every stored object is data (ONNX bytes, LightGBM text, float32 bytes with
-- their shape) with the SHA-256 it is checked against before use.

CREATE TABLE lungsql.cnn_models (
    cnn_id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    format         text NOT NULL DEFAULT 'onnx' CHECK (format = 'onnx'),
    model          bytea NOT NULL,
    sha256         text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    input_name     text NOT NULL,
    input_size     integer NOT NULL CHECK (input_size > 0),
    output_name    text NOT NULL,
    feature_dim    integer NOT NULL CHECK (feature_dim > 0),
    preprocessing  jsonb NOT NULL,      -- window, image size, mean and std the CNN expects
    source         jsonb NOT NULL,      -- where the weights came from, exporter versions
    created_at     timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE lungsql.cnn_models ALTER COLUMN model SET STORAGE EXTERNAL;  -- already dense

-- One featurization run: what a CALL lungsql.generate_features did.
CREATE TABLE lungsql.feature_runs (
    run_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cnn_id       integer NOT NULL REFERENCES lungsql.cnn_models ON DELETE CASCADE,
    provider     text NOT NULL,      -- ONNX Runtime execution provider actually used
    shard        integer NOT NULL,
    shards       integer NOT NULL,
    patients     integer NOT NULL DEFAULT 0,
    slices       integer NOT NULL DEFAULT 0,
    seconds      double precision NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

-- Features of one patient under one CNN: n_groups x dim float32 (little
-- endian, C order), one row per group of three consecutive slices, so the
-- per-patient vector can change without running the CNN again.
CREATE TABLE lungsql.features (
    patient_id  text NOT NULL REFERENCES lungsql.patients ON DELETE CASCADE,
    cnn_id      integer NOT NULL REFERENCES lungsql.cnn_models ON DELETE CASCADE,
    n_slices    integer NOT NULL CHECK (n_slices > 0),
    n_groups    integer NOT NULL CHECK (n_groups > 0),
    dim         integer NOT NULL CHECK (dim > 0),
    data        bytea NOT NULL CHECK (length(data) = 4 * n_groups * dim),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    run_id      bigint REFERENCES lungsql.feature_runs ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, cnn_id)
);

-- Trained classifiers, in LightGBM's own text format.
CREATE TABLE lungsql.models (
    model_id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL,
    version        integer NOT NULL,
    algorithm      text NOT NULL DEFAULT 'lightgbm',
    cnn_id         integer NOT NULL REFERENCES lungsql.cnn_models,
    feature_set    text NOT NULL,       -- how a patient's vector is built from the group features
    feature_names  jsonb NOT NULL,
    params         jsonb NOT NULL,
    model_text     text NOT NULL,
    sha256         text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    metrics        jsonb NOT NULL,      -- validation AUC, log loss, Brier, ROC points, counts
    trained_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version)
);

-- The registry: which model serves each name; the latest row wins.
CREATE TABLE lungsql.deployments (
    deployment_id  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL,
    model_id       integer NOT NULL REFERENCES lungsql.models ON DELETE CASCADE,
    strategy       text NOT NULL,
    deployed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deployments_name_latest ON lungsql.deployments (name, deployment_id DESC);

-- Every probability the scoring function returned.
CREATE TABLE lungsql.predictions (
    prediction_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    patient_id     text NOT NULL REFERENCES lungsql.patients ON DELETE CASCADE,
    model_id       integer NOT NULL REFERENCES lungsql.models ON DELETE CASCADE,
    probability    double precision NOT NULL CHECK (probability BETWEEN 0 AND 1),
    predicted_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX predictions_patient ON lungsql.predictions (patient_id, predicted_at DESC);
