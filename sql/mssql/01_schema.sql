-- lungsql on SQL Server: the tables, equivalent to sql/postgres/migrations/00*.sql.
--
-- Run in the lungsql database as its owner (db_owner), after 00_instance.sql:
-- in SSMS, or `sqlcmd -d lungsql -i 01_schema.sql`. Safe to run again: each
-- object is created only when it is missing, and nothing existing is changed.
--
-- The tables live in the schema lungsql with the names they have in PostgreSQL,
-- so the upload, the CLI and the web app name the same tables on both
-- databases; the procedures DBAs call are in dbo (02_procedures.sql).
--
-- Types: DICOM and ONNX bytes are varbinary(max); LightGBM's model is
-- nvarchar(max) in its own text format; JSON documents are nvarchar(max)
-- checked with ISJSON; hex SHA-256 digests are char(64) in a binary collation,
-- so that only lowercase hex passes their CHECK. Times are datetime2 in UTC.

IF SCHEMA_ID(N'lungsql') IS NULL
    EXEC (N'CREATE SCHEMA lungsql AUTHORIZATION dbo');
GO

-- -- version 1: patients, their DICOM scans, labels, uploads ------------------

IF OBJECT_ID(N'lungsql.patients', N'U') IS NULL
    CREATE TABLE lungsql.patients (
        patient_id  nvarchar(64) NOT NULL             -- DICOM PatientID (LO: at most 64 characters)
            CONSTRAINT pk_patients PRIMARY KEY
            CONSTRAINT ck_patients_id CHECK (patient_id <> N''),
        name        nvarchar(256) NULL,               -- PatientName as 'Given Family'; NULL when de-identified
        sex         char(1) NULL CONSTRAINT ck_patients_sex CHECK (sex IN ('M', 'F', 'O')),
        birth_date  date NULL,
        age_years   real NULL CONSTRAINT ck_patients_age CHECK (age_years >= 0 AND age_years < 150),
        label       smallint NULL CONSTRAINT ck_patients_label CHECK (label IN (0, 1)),  -- 1 = cancer, when known
        created_at  datetime2(3) NOT NULL CONSTRAINT df_patients_created DEFAULT SYSUTCDATETIME()
    );
GO

-- One row per DICOM instance (a CT slice), with the file's bytes unchanged.
-- A rerun of an upload skips the instances already stored (by SOPInstanceUID).
IF OBJECT_ID(N'lungsql.scans', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.scans (
        scan_id             bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_scans PRIMARY KEY,
        sop_instance_uid    varchar(64) NOT NULL CONSTRAINT uq_scans_sop_instance_uid UNIQUE,
        patient_id          nvarchar(64) NOT NULL
            CONSTRAINT fk_scans_patient REFERENCES lungsql.patients (patient_id) ON DELETE CASCADE,
        study_instance_uid  varchar(64) NOT NULL,
        series_instance_uid varchar(64) NOT NULL,
        instance_number     int NULL,
        z_position          float NOT NULL,            -- ImagePositionPatient[2], mm
        [rows]              int NOT NULL CONSTRAINT ck_scans_rows CHECK ([rows] > 0),
        [columns]           int NOT NULL CONSTRAINT ck_scans_columns CHECK ([columns] > 0),
        pixel_spacing_row   float NULL,                -- PixelSpacing[0], mm
        pixel_spacing_col   float NULL,                -- PixelSpacing[1], mm
        slice_thickness     float NULL,
        rescale_slope       float NOT NULL CONSTRAINT df_scans_slope DEFAULT 1,
        rescale_intercept   float NOT NULL CONSTRAINT df_scans_intercept DEFAULT 0,
        modality            varchar(16) NOT NULL,
        transfer_syntax_uid varchar(64) NOT NULL,
        dicom               varbinary(max) NOT NULL,
        sha256              binary(32) NOT NULL,       -- of dicom
        ingested_at         datetime2(3) NOT NULL CONSTRAINT df_scans_ingested DEFAULT SYSUTCDATETIME()
    );
    -- A patient's slices in z order, series by series: what featurization reads.
    CREATE INDEX ix_scans_patient_series_z ON lungsql.scans (patient_id, series_instance_uid, z_position);
END;
GO

-- Labels as they were loaded (e.g. from stage1_labels.csv), also for patients
-- whose scans have not arrived yet; patients.label holds the latest one.
IF OBJECT_ID(N'lungsql.labels', N'U') IS NULL
    CREATE TABLE lungsql.labels (
        patient_id  nvarchar(64) NOT NULL CONSTRAINT pk_labels PRIMARY KEY,
        cancer      smallint NOT NULL CONSTRAINT ck_labels_cancer CHECK (cancer IN (0, 1)),
        source      nvarchar(max) NOT NULL,
        loaded_at   datetime2(3) NOT NULL CONSTRAINT df_labels_loaded DEFAULT SYSUTCDATETIME()
    );
GO

-- One row per upload run.
IF OBJECT_ID(N'lungsql.ingest_runs', N'U') IS NULL
    CREATE TABLE lungsql.ingest_runs (
        run_id      bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_ingest_runs PRIMARY KEY,
        source_dir  nvarchar(max) NOT NULL,
        deidentify  bit NOT NULL,
        started_at  datetime2(3) NOT NULL CONSTRAINT df_ingest_runs_started DEFAULT SYSUTCDATETIME(),
        finished_at datetime2(3) NULL,
        files_seen  int NOT NULL CONSTRAINT df_ingest_runs_files_seen DEFAULT 0,
        stored      int NOT NULL CONSTRAINT df_ingest_runs_stored DEFAULT 0,
        skipped     int NOT NULL CONSTRAINT df_ingest_runs_skipped DEFAULT 0,
        errors      int NOT NULL CONSTRAINT df_ingest_runs_errors DEFAULT 0,
        bytes       bigint NOT NULL CONSTRAINT df_ingest_runs_bytes DEFAULT 0,
        seconds     float NULL
    );
GO

-- Files an upload could not store, with a one-line reason. A file that fails
-- again on a later run updates its row instead of adding one: (source_path,
-- reason) is unique through error_key, its SHA-256 (paths can be longer than
-- an index key may be).
IF OBJECT_ID(N'lungsql.ingest_errors', N'U') IS NULL
    CREATE TABLE lungsql.ingest_errors (
        error_id    bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_ingest_errors PRIMARY KEY,
        source_path nvarchar(max) NOT NULL,
        reason      nvarchar(max) NOT NULL,
        run_id      bigint NULL
            CONSTRAINT fk_ingest_errors_run REFERENCES lungsql.ingest_runs (run_id) ON DELETE SET NULL,
        occurred_at datetime2(3) NOT NULL CONSTRAINT df_ingest_errors_occurred DEFAULT SYSUTCDATETIME(),
        error_key   AS CAST(HASHBYTES('SHA2_256', CONCAT(source_path, NCHAR(0), reason)) AS binary(32)) PERSISTED
            CONSTRAINT uq_ingest_errors_path_reason UNIQUE
    );
GO

-- -- version 2: the CNN, features, models, the registry, predictions ------------

IF OBJECT_ID(N'lungsql.cnn_models', N'U') IS NULL
    CREATE TABLE lungsql.cnn_models (
        cnn_id         int IDENTITY (1, 1) NOT NULL CONSTRAINT pk_cnn_models PRIMARY KEY,
        name           nvarchar(100) NOT NULL CONSTRAINT uq_cnn_models_name UNIQUE,
        format         varchar(8) NOT NULL CONSTRAINT df_cnn_models_format DEFAULT 'onnx'
            CONSTRAINT ck_cnn_models_format CHECK (format = 'onnx'),
        model          varbinary(max) NOT NULL,      -- the ONNX bytes
        sha256         char(64) COLLATE Latin1_General_100_BIN2 NOT NULL
            CONSTRAINT ck_cnn_models_sha256 CHECK (sha256 NOT LIKE '%[^0-9a-f]%'),
        input_name     nvarchar(256) NOT NULL,
        input_size     int NOT NULL CONSTRAINT ck_cnn_models_input_size CHECK (input_size > 0),
        output_name    nvarchar(256) NOT NULL,
        feature_dim    int NOT NULL CONSTRAINT ck_cnn_models_feature_dim CHECK (feature_dim > 0),
        preprocessing  nvarchar(max) NOT NULL        -- window, image size, mean and std the CNN expects
            CONSTRAINT ck_cnn_models_preprocessing CHECK (ISJSON(preprocessing) = 1),
        source         nvarchar(max) NOT NULL        -- where the weights came from, exporter versions
            CONSTRAINT ck_cnn_models_source CHECK (ISJSON(source) = 1),
        created_at     datetime2(3) NOT NULL CONSTRAINT df_cnn_models_created DEFAULT SYSUTCDATETIME()
    );
GO

-- One featurization run: what an EXEC dbo.GenerateFeatures did. Its CNN cannot
-- be deleted while runs refer to it (SQL Server allows one cascade path from
-- cnn_models to features, and that is features.cnn_id): delete the CNN's
-- features and runs first, as `lungsql model import --replace` does.
IF OBJECT_ID(N'lungsql.feature_runs', N'U') IS NULL
    CREATE TABLE lungsql.feature_runs (
        run_id       bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_feature_runs PRIMARY KEY,
        cnn_id       int NOT NULL CONSTRAINT fk_feature_runs_cnn REFERENCES lungsql.cnn_models (cnn_id),
        provider     nvarchar(100) NOT NULL,         -- ONNX Runtime execution provider actually used
        shard        int NOT NULL,
        shards       int NOT NULL,
        patients     int NOT NULL CONSTRAINT df_feature_runs_patients DEFAULT 0,
        slices       int NOT NULL CONSTRAINT df_feature_runs_slices DEFAULT 0,
        seconds      float NOT NULL CONSTRAINT df_feature_runs_seconds DEFAULT 0,
        started_at   datetime2(3) NOT NULL CONSTRAINT df_feature_runs_started DEFAULT SYSUTCDATETIME(),
        finished_at  datetime2(3) NULL
    );
GO

-- How many patients a run skipped (lungsql.feature_failures says why).
IF COL_LENGTH(N'lungsql.feature_runs', N'failed') IS NULL
    ALTER TABLE lungsql.feature_runs ADD failed int NOT NULL CONSTRAINT df_feature_runs_failed DEFAULT 0;
GO

-- Features of one patient under one CNN: n_groups x dim float32 (little
-- endian, C order), one row per group of three consecutive slices. One row per
-- (patient, CNN): featurizing again replaces it.
IF OBJECT_ID(N'lungsql.features', N'U') IS NULL
    CREATE TABLE lungsql.features (
        patient_id  nvarchar(64) NOT NULL
            CONSTRAINT fk_features_patient REFERENCES lungsql.patients (patient_id) ON DELETE CASCADE,
        cnn_id      int NOT NULL
            CONSTRAINT fk_features_cnn REFERENCES lungsql.cnn_models (cnn_id) ON DELETE CASCADE,
        n_slices    int NOT NULL CONSTRAINT ck_features_n_slices CHECK (n_slices > 0),
        n_groups    int NOT NULL CONSTRAINT ck_features_n_groups CHECK (n_groups > 0),
        dim         int NOT NULL CONSTRAINT ck_features_dim CHECK (dim > 0),
        data        varbinary(max) NOT NULL,
        sha256      char(64) COLLATE Latin1_General_100_BIN2 NOT NULL
            CONSTRAINT ck_features_sha256 CHECK (sha256 NOT LIKE '%[^0-9a-f]%'),
        run_id      bigint NULL
            CONSTRAINT fk_features_run REFERENCES lungsql.feature_runs (run_id) ON DELETE SET NULL,
        created_at  datetime2(3) NOT NULL CONSTRAINT df_features_created DEFAULT SYSUTCDATETIME(),
        CONSTRAINT pk_features PRIMARY KEY (patient_id, cnn_id),
        CONSTRAINT ck_features_length CHECK (DATALENGTH(data) = 4 * CAST(n_groups AS bigint) * dim)
    );
GO

-- Patients a featurization run could not featurize with a CNN, and why (an
-- undecodable slice, a series whose slices cannot be stacked...). Later runs
-- leave them out until @RetryFailed = 1 or until their scans change; a
-- success deletes the row.
IF OBJECT_ID(N'lungsql.feature_failures', N'U') IS NULL
    CREATE TABLE lungsql.feature_failures (
        patient_id  nvarchar(64) NOT NULL
            CONSTRAINT fk_feature_failures_patient REFERENCES lungsql.patients (patient_id) ON DELETE CASCADE,
        cnn_id      int NOT NULL
            CONSTRAINT fk_feature_failures_cnn REFERENCES lungsql.cnn_models (cnn_id) ON DELETE CASCADE,
        run_id      bigint NULL
            CONSTRAINT fk_feature_failures_run REFERENCES lungsql.feature_runs (run_id) ON DELETE SET NULL,
        reason      nvarchar(2000) NOT NULL,
        failed_at   datetime2(3) NOT NULL CONSTRAINT df_feature_failures_at DEFAULT SYSUTCDATETIME(),
        CONSTRAINT pk_feature_failures PRIMARY KEY (patient_id, cnn_id)
    );
GO

-- -- version 8: the series a patient is featurized from, chosen on purpose; Enhanced CT --
-- What the choice of series reads from each file (a localizer, the tilt from
-- axial, kernel, description) and a multi-frame file's frame positions (a JSON
-- array: SQL Server has no arrays).
IF COL_LENGTH(N'lungsql.scans', N'frames') IS NULL
    ALTER TABLE lungsql.scans ADD
        image_type         nvarchar(256) NULL,
        series_description nvarchar(256) NULL,
        convolution_kernel nvarchar(256) NULL,
        tilt_degrees       float NULL,
        frames             int NOT NULL CONSTRAINT df_scans_frames DEFAULT 1
            CONSTRAINT ck_scans_frames CHECK (frames > 0),
        frame_z            nvarchar(max) NULL CONSTRAINT ck_scans_frame_z CHECK (frame_z IS NULL OR ISJSON(frame_z) = 1);
GO
-- The series the features were computed from, and why it was chosen.
IF COL_LENGTH(N'lungsql.features', N'series_instance_uid') IS NULL
    ALTER TABLE lungsql.features ADD series_instance_uid varchar(64) NULL, series_reason nvarchar(400) NULL;
GO
-- A DBA's choice of series for a patient, which overrides the rule.
IF OBJECT_ID(N'lungsql.series_choices', N'U') IS NULL
    CREATE TABLE lungsql.series_choices (
        patient_id          nvarchar(64) NOT NULL CONSTRAINT pk_series_choices PRIMARY KEY
            CONSTRAINT fk_series_choices_patient REFERENCES lungsql.patients (patient_id) ON DELETE CASCADE,
        series_instance_uid varchar(64) NOT NULL,
        chosen_by           nvarchar(128) NOT NULL CONSTRAINT df_series_choices_by DEFAULT SUSER_SNAME(),
        chosen_at           datetime2(3) NOT NULL CONSTRAINT df_series_choices_at DEFAULT SYSUTCDATETIME()
    );
GO

-- Trained classifiers, in LightGBM's own text format.
IF OBJECT_ID(N'lungsql.models', N'U') IS NULL
    CREATE TABLE lungsql.models (
        model_id       int IDENTITY (1, 1) NOT NULL CONSTRAINT pk_models PRIMARY KEY,
        name           nvarchar(100) NOT NULL,
        version        int NOT NULL,
        algorithm      nvarchar(50) NOT NULL CONSTRAINT df_models_algorithm DEFAULT N'lightgbm',
        cnn_id         int NOT NULL CONSTRAINT fk_models_cnn REFERENCES lungsql.cnn_models (cnn_id),
        feature_set    nvarchar(100) NOT NULL,       -- how a patient's vector is built from the group features
        feature_names  nvarchar(max) NOT NULL CONSTRAINT ck_models_feature_names CHECK (ISJSON(feature_names) = 1),
        params         nvarchar(max) NOT NULL CONSTRAINT ck_models_params CHECK (ISJSON(params) = 1),
        model_text     nvarchar(max) NOT NULL,
        sha256         char(64) COLLATE Latin1_General_100_BIN2 NOT NULL   -- of model_text as UTF-8
            CONSTRAINT ck_models_sha256 CHECK (sha256 NOT LIKE '%[^0-9a-f]%'),
        metrics        nvarchar(max) NOT NULL        -- validation AUC, log loss, Brier, ROC points, counts
            CONSTRAINT ck_models_metrics CHECK (ISJSON(metrics) = 1),
        trained_at     datetime2(3) NOT NULL CONSTRAINT df_models_trained DEFAULT SYSUTCDATETIME(),
        CONSTRAINT uq_models_name_version UNIQUE (name, version)
    );
GO

-- The registry: which model serves each name; the latest row wins.
IF OBJECT_ID(N'lungsql.deployments', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.deployments (
        deployment_id  int IDENTITY (1, 1) NOT NULL CONSTRAINT pk_deployments PRIMARY KEY,
        name           nvarchar(100) NOT NULL,
        model_id       int NOT NULL
            CONSTRAINT fk_deployments_model REFERENCES lungsql.models (model_id) ON DELETE CASCADE,
        strategy       nvarchar(100) NOT NULL,
        deployed_at    datetime2(3) NOT NULL CONSTRAINT df_deployments_deployed DEFAULT SYSUTCDATETIME()
    );
    CREATE INDEX ix_deployments_name_latest ON lungsql.deployments (name, deployment_id DESC) INCLUDE (model_id);
END;
GO

-- Every probability the scoring procedures returned.
IF OBJECT_ID(N'lungsql.predictions', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.predictions (
        prediction_id  bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_predictions PRIMARY KEY,
        patient_id     nvarchar(64) NOT NULL
            CONSTRAINT fk_predictions_patient REFERENCES lungsql.patients (patient_id) ON DELETE CASCADE,
        model_id       int NOT NULL
            CONSTRAINT fk_predictions_model REFERENCES lungsql.models (model_id) ON DELETE CASCADE,
        probability    float NOT NULL CONSTRAINT ck_predictions_probability CHECK (probability BETWEEN 0 AND 1),
        predicted_at   datetime2(3) NOT NULL CONSTRAINT df_predictions_predicted DEFAULT SYSUTCDATETIME()
    );
    CREATE INDEX ix_predictions_patient ON lungsql.predictions (patient_id, predicted_at DESC);
END;
GO

-- -- version 3: the web app's users and its audit trail ---------------------------

-- People who log in to the web app. Passwords are stored as salted hashes
-- (werkzeug's scrypt), never in clear.
IF OBJECT_ID(N'lungsql.users', N'U') IS NULL
    CREATE TABLE lungsql.users (
        user_id        int IDENTITY (1, 1) NOT NULL CONSTRAINT pk_users PRIMARY KEY,
        username       nvarchar(64) COLLATE Latin1_General_100_BIN2 NOT NULL
            CONSTRAINT uq_users_username UNIQUE
            CONSTRAINT ck_users_username CHECK (username <> N'' AND username NOT LIKE N'%[^A-Za-z0-9_.@-]%'),
        password_hash  nvarchar(512) NOT NULL,
        role           varchar(16) NOT NULL CONSTRAINT ck_users_role CHECK (role IN ('clinician', 'admin')),
        disabled       bit NOT NULL CONSTRAINT df_users_disabled DEFAULT 0,
        created_at     datetime2(3) NOT NULL CONSTRAINT df_users_created DEFAULT SYSUTCDATETIME()
    );
GO

-- Who viewed or scored which patient, when, from where. The web app's role
-- may add rows and read them, never change or delete them (03_security.sql).
IF OBJECT_ID(N'lungsql.audit_log', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.audit_log (
        audit_id     bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_audit_log PRIMARY KEY,
        occurred_at  datetime2(3) NOT NULL CONSTRAINT df_audit_log_occurred DEFAULT SYSUTCDATETIME(),
        username     nvarchar(64) NULL,
        action       nvarchar(100) NOT NULL,
        patient_id   nvarchar(64) NULL,
        address      nvarchar(100) NULL,
        detail       nvarchar(max) NOT NULL CONSTRAINT df_audit_log_detail DEFAULT N'{}'
            CONSTRAINT ck_audit_log_detail CHECK (ISJSON(detail) = 1)
    );
    CREATE INDEX ix_audit_log_recent ON lungsql.audit_log (occurred_at DESC);
    CREATE INDEX ix_audit_log_patient ON lungsql.audit_log (patient_id, occurred_at DESC);
END;
GO

-- -- version 9: chest radiographs with the 14 findings of ChestX-ray14 ---------------
-- Scored here by dbo.PredictFindings; uploaded, featurized and trained on
-- PostgreSQL for now (lungsql ingest --task chest_xray14 is PostgreSQL only).

IF COL_LENGTH(N'lungsql.models', N'task') IS NULL
    ALTER TABLE lungsql.models ADD task nvarchar(32) NOT NULL CONSTRAINT df_models_task DEFAULT N'lung_cancer';
GO

-- One row per radiograph, the file's bytes unchanged (a PNG or a DICOM file).
IF OBJECT_ID(N'lungsql.radiographs', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.radiographs (
        image_id            bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_radiographs PRIMARY KEY,
        image_index         nvarchar(128) NOT NULL CONSTRAINT uq_radiographs_index UNIQUE,
        patient_id          nvarchar(64) NOT NULL
            CONSTRAINT fk_radiographs_patient REFERENCES lungsql.patients (patient_id) ON DELETE CASCADE,
        format              varchar(8) NOT NULL CONSTRAINT ck_radiographs_format CHECK (format IN ('png', 'dicom')),
        data                varbinary(max) NOT NULL,
        sha256              binary(32) NOT NULL,
        rows                int NOT NULL,
        columns             int NOT NULL,
        bits_stored         smallint NOT NULL,
        photometric         varchar(16) NOT NULL,
        modality            varchar(16) NULL,
        view_position       varchar(16) NULL,
        pixel_spacing_mm    float NULL,
        follow_up           int NULL,
        study_instance_uid  varchar(64) NULL,
        series_instance_uid varchar(64) NULL,
        transfer_syntax_uid varchar(64) NULL,
        run_id              bigint NULL,
        ingested_at         datetime2(3) NOT NULL CONSTRAINT df_radiographs_ingested DEFAULT SYSUTCDATETIME()
    );
    CREATE INDEX ix_radiographs_patient ON lungsql.radiographs (patient_id);
END;
GO

-- CNN features of one radiograph: dim float32 (little endian).
IF OBJECT_ID(N'lungsql.image_features', N'U') IS NULL
    CREATE TABLE lungsql.image_features (
        image_id    bigint NOT NULL
            CONSTRAINT fk_image_features_image REFERENCES lungsql.radiographs (image_id) ON DELETE CASCADE,
        cnn_id      int NOT NULL CONSTRAINT fk_image_features_cnn REFERENCES lungsql.cnn_models (cnn_id),
        dim         int NOT NULL,
        data        varbinary(max) NOT NULL,
        sha256      char(64) COLLATE Latin1_General_100_BIN2 NOT NULL,
        run_id      bigint NULL,
        created_at  datetime2(3) NOT NULL CONSTRAINT df_image_features_created DEFAULT SYSUTCDATETIME(),
        CONSTRAINT pk_image_features PRIMARY KEY (image_id, cnn_id)
    );
GO

-- A multi-label model's boosters, one per finding; lungsql.models.model_text holds
-- the manifest naming them, and models.sha256 the manifest's SHA-256.
IF OBJECT_ID(N'lungsql.model_boosters', N'U') IS NULL
    CREATE TABLE lungsql.model_boosters (
        model_id    int NOT NULL
            CONSTRAINT fk_model_boosters_model REFERENCES lungsql.models (model_id) ON DELETE CASCADE,
        finding     nvarchar(64) NOT NULL,
        model_text  nvarchar(max) NOT NULL,
        sha256      char(64) COLLATE Latin1_General_100_BIN2 NOT NULL,
        CONSTRAINT pk_model_boosters PRIMARY KEY (model_id, finding)
    );
GO

-- Every probability of a finding dbo.PredictFindings returned.
IF OBJECT_ID(N'lungsql.finding_predictions', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.finding_predictions (
        prediction_id  bigint IDENTITY (1, 1) NOT NULL CONSTRAINT pk_finding_predictions PRIMARY KEY,
        image_id       bigint NOT NULL
            CONSTRAINT fk_finding_predictions_image REFERENCES lungsql.radiographs (image_id) ON DELETE CASCADE,
        model_id       int NOT NULL
            CONSTRAINT fk_finding_predictions_model REFERENCES lungsql.models (model_id),
        finding        nvarchar(64) NOT NULL,
        probability    float NOT NULL CONSTRAINT ck_finding_predictions_probability CHECK (probability BETWEEN 0 AND 1),
        predicted_at   datetime2(3) NOT NULL CONSTRAINT df_finding_predictions_predicted DEFAULT SYSUTCDATETIME()
    );
    CREATE INDEX ix_finding_predictions_image ON lungsql.finding_predictions (image_id, predicted_at DESC);
END;
GO

-- The tasks and, for a multi-label task, its findings in their order.
IF OBJECT_ID(N'lungsql.tasks', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.tasks (
        task         nvarchar(32) NOT NULL CONSTRAINT pk_tasks PRIMARY KEY,
        study_shape  varchar(8) NOT NULL CONSTRAINT ck_tasks_shape CHECK (study_shape IN ('volume', 'image')),
        labels       varchar(16) NOT NULL CONSTRAINT ck_tasks_labels CHECK (labels IN ('binary', 'multi_label')),
        description  nvarchar(400) NOT NULL
    );
    INSERT INTO lungsql.tasks VALUES
        (N'lung_cancer', 'volume', 'binary', N'lung cancer from a CT series (Kaggle DSB 2017)'),
        (N'chest_xray14', 'image', 'multi_label', N'the 14 findings of NIH ChestX-ray14 on a frontal chest radiograph');
END;
GO

IF OBJECT_ID(N'lungsql.findings', N'U') IS NULL
BEGIN
    CREATE TABLE lungsql.findings (
        task      nvarchar(32) NOT NULL CONSTRAINT fk_findings_task REFERENCES lungsql.tasks (task),
        finding   nvarchar(64) NOT NULL,
        position  smallint NOT NULL,
        CONSTRAINT pk_findings PRIMARY KEY (task, finding)
    );
    INSERT INTO lungsql.findings (task, finding, position)
    SELECT N'chest_xray14', f.value, CAST(f.[key] AS smallint) + 1
    FROM OPENJSON(N'["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                     "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]') AS f;
END;
GO

-- The findings of each image, as a labels file gives them (a JSON array; [] is
-- 'No Finding'), also for images not uploaded; split: the official list.
IF OBJECT_ID(N'lungsql.image_labels', N'U') IS NULL
    CREATE TABLE lungsql.image_labels (
        image_index   nvarchar(128) NOT NULL CONSTRAINT pk_image_labels PRIMARY KEY,
        patient_id    nvarchar(64) NOT NULL,
        task          nvarchar(32) NOT NULL CONSTRAINT df_image_labels_task DEFAULT N'chest_xray14',
        findings      nvarchar(1000) NOT NULL CONSTRAINT ck_image_labels_findings CHECK (ISJSON(findings) = 1),
        split         varchar(16) NULL CONSTRAINT ck_image_labels_split CHECK (split IN ('train_val', 'test')),
        follow_up     int NULL,
        age_years     real NULL,
        sex           varchar(1) NULL,
        view_position varchar(16) NULL,
        source        nvarchar(400) NOT NULL,
        loaded_at     datetime2(3) NOT NULL CONSTRAINT df_image_labels_loaded DEFAULT SYSUTCDATETIME()
    );
GO

IF OBJECT_ID(N'lungsql.image_feature_failures', N'U') IS NULL
    CREATE TABLE lungsql.image_feature_failures (
        image_id    bigint NOT NULL
            CONSTRAINT fk_image_feature_failures_image REFERENCES lungsql.radiographs (image_id) ON DELETE CASCADE,
        cnn_id      int NOT NULL CONSTRAINT fk_image_feature_failures_cnn REFERENCES lungsql.cnn_models (cnn_id),
        run_id      bigint NULL,
        reason      nvarchar(1000) NOT NULL,
        failed_at   datetime2(3) NOT NULL CONSTRAINT df_image_feature_failures_failed DEFAULT SYSUTCDATETIME(),
        CONSTRAINT pk_image_feature_failures PRIMARY KEY (image_id, cnn_id)
    );
GO
