-- lungsql on SQL Server: the pipeline as stored procedures, for DBAs in SSMS.
--
-- Run in the lungsql database after 01_schema.sql (CREATE OR ALTER: safe to
-- run again). The names are those of the 2017 demo: dbo.GenerateFeatures,
-- dbo.TrainLungCancerModel, dbo.PredictLungCancer, plus the batch scoring,
-- the registry and an environment check.
--
-- Each procedure reads what it needs with T-SQL and hands it to Python through
-- sp_execute_external_script: rows through @input_data_1 (InputDataSet),
-- values through @params. Python returns OutputDataSet and OUTPUT parameters,
-- and T-SQL writes them to the tables. Python never connects back to the
-- database and holds no credentials. Each @script calls one function of
-- lungsql.server.mssql, on top of the same lungsql.server.pipeline the PostgreSQL
-- procedures run.
--
-- Errors are raised with THROW: 50000 from Python (the message names the
-- problem, then a hint), 50001 a bad argument, 50002 something to do first
-- (no CNN, no model), 50003 stored bytes that do not match their SHA-256.

-- What Python inside SQL Server sees: one row per component with its version
-- and where it was loaded from; an error naming what is missing.
--
--   EXEC dbo.CheckLungSQLEnvironment;
CREATE OR ALTER PROCEDURE dbo.CheckLungSQLEnvironment
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @error nvarchar(max);
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from lungsql.server import mssql
OutputDataSet, error = mssql.check_environment()
',
        @params = N'@error nvarchar(max) OUTPUT',
        @error = @error OUTPUT
    WITH RESULT SETS ((component nvarchar(100), version nvarchar(100), location nvarchar(1000)));
    IF @error IS NOT NULL
    BEGIN
        SET @error = LEFT(@error, 2000);
        THROW 50000, @error, 1;
    END;
END;
GO

-- Featurize the patients' CT slices with a CNN stored in lungsql.cnn_models.
-- Each patient is committed on its own: a cancelled run keeps the patients it
-- finished, and a rerun continues where it stopped. Progress lines appear in
-- the Messages tab as they happen; lungsql.feature_runs keeps the run. Returns
-- one row: the run, its CNN and execution provider, patients, slices, seconds.
--
--   EXEC dbo.GenerateFeatures;
--   EXEC dbo.GenerateFeatures @Shard = 0, @Shards = 2;  -- and @Shard = 1 in another session
--   EXEC dbo.GenerateFeatures @RetryFailed = 1;          -- after fixing the patients that failed
CREATE OR ALTER PROCEDURE dbo.GenerateFeatures
    @CnnName     nvarchar(100) = NULL,  -- a name in lungsql.cnn_models; NULL: the newest CNN
    @OnlyMissing bit = 1,               -- 0: featurize every patient again
    @Shard       int = 0,               -- this session's part, 0 .. @Shards - 1
    @Shards      int = 1,               -- number of sessions sharing the work
    @RetryFailed bit = 0                -- 1: also the patients in lungsql.feature_failures
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @message nvarchar(2048);
    IF @@TRANCOUNT > 0
        THROW 50001, N'lungsql: dbo.GenerateFeatures commits each patient, so it cannot run inside a transaction
Hint: run EXEC dbo.GenerateFeatures on its own, outside BEGIN TRANSACTION ... COMMIT', 1;
    IF @Shards IS NULL OR @Shard IS NULL OR @Shards < 1 OR @Shard < 0 OR @Shard >= @Shards
    BEGIN
        SET @message = CONCAT(
            N'lungsql: @Shard must be in 0 .. @Shards - 1 and @Shards >= 1; got @Shard = ',
            ISNULL(CAST(@Shard AS nvarchar(12)), N'NULL'), N', @Shards = ', ISNULL(CAST(@Shards AS nvarchar(12)), N'NULL'),
            NCHAR(10), N'Hint: e.g. @Shard = 0, @Shards = 2 and @Shard = 1, @Shards = 2 in two sessions');
        THROW 50001, @message, 1;
    END;
    SET @OnlyMissing = ISNULL(@OnlyMissing, 1);
    SET @RetryFailed = ISNULL(@RetryFailed, 0);

    -- The CNN, checked against its SHA-256 before anything runs.
    DECLARE @cnn_id int, @cnn_name nvarchar(100), @cnn_model varbinary(max), @cnn_sha256 char(64),
            @input_name nvarchar(256), @output_name nvarchar(256), @preprocessing nvarchar(max),
            @cnn_source nvarchar(max);  -- names the runtime and precision a reduced-precision variant runs in
    SELECT TOP (1)
        @cnn_id = cnn_id, @cnn_name = name, @cnn_model = model, @cnn_sha256 = sha256,
        @input_name = input_name, @output_name = output_name, @preprocessing = preprocessing,
        @cnn_source = source
    FROM lungsql.cnn_models
    WHERE @CnnName IS NULL OR name = @CnnName
    ORDER BY created_at DESC, cnn_id DESC;
    IF @cnn_id IS NULL
    BEGIN
        SET @message = CONCAT(
            CASE WHEN @CnnName IS NULL THEN N'lungsql: no CNN is stored'
                 ELSE CONCAT(N'lungsql: no CNN named ''', @CnnName, N'''') END,
            NCHAR(10), N'Hint: import one: lungsql model import --builtin efficientnet-lite0');
        THROW 50002, @message, 1;
    END;
    IF LOWER(CONVERT(char(64), HASHBYTES('SHA2_256', @cnn_model), 2)) <> @cnn_sha256
    BEGIN
        SET @message = CONCAT(
            N'lungsql: the bytes of CNN ''', @cnn_name, N''' do not match their SHA-256: the stored model ',
            N'was altered; nothing was featurized', NCHAR(10),
            N'Hint: import the CNN again: lungsql model import ... --replace --name ', @cnn_name);
        THROW 50003, @message, 1;
    END;

    -- The patients to featurize: with scans, without features when @OnlyMissing,
    -- in this shard (lungsql.server.pipeline.in_shard decides, as on PostgreSQL).
    CREATE TABLE #todo (patient_id nvarchar(64) NOT NULL PRIMARY KEY);
    INSERT INTO #todo (patient_id)
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from lungsql.server import mssql
OutputDataSet = mssql.patients_in_shard(InputDataSet, shard, shards)
',
        @input_data_1 = N'
SELECT p.patient_id
FROM lungsql.patients AS p
WHERE EXISTS (SELECT 1 FROM lungsql.scans AS s WHERE s.patient_id = p.patient_id)
  AND NOT (@only_missing = 1
           AND EXISTS (SELECT 1 FROM lungsql.features AS f
                       WHERE f.patient_id = p.patient_id AND f.cnn_id = @cnn_id))
  AND NOT (@retry_failed = 0
           AND EXISTS (SELECT 1 FROM lungsql.feature_failures AS ff
                       WHERE ff.patient_id = p.patient_id AND ff.cnn_id = @cnn_id
                         AND ff.failed_at >= (SELECT MAX(s.ingested_at) FROM lungsql.scans AS s
                                              WHERE s.patient_id = p.patient_id)))',
        @params = N'@cnn_id int, @only_missing bit, @retry_failed bit, @shard int, @shards int',
        @cnn_id = @cnn_id,
        @only_missing = @OnlyMissing,
        @retry_failed = @RetryFailed,
        @shard = @Shard,
        @shards = @Shards;

    DECLARE @total int = (SELECT COUNT(*) FROM #todo), @run_id bigint;
    INSERT INTO lungsql.feature_runs (cnn_id, provider, shard, shards)
    VALUES (@cnn_id, N'unknown', @Shard, @Shards);
    SET @run_id = SCOPE_IDENTITY();
    RAISERROR (N'featurizing %d patients with CNN ''%s'' (shard %d of %d)', 0, 1,
               @total, @cnn_name, @Shard, @Shards) WITH NOWAIT;

    DECLARE @patient_id nvarchar(64), @done int = 0, @failed int = 0, @slices int = 0, @rate int,
            @seconds float = 0, @started datetime2(7) = SYSUTCDATETIME(), @error nvarchar(max),
            @provider nvarchar(100), @n_slices int, @n_groups int, @dim int, @data varbinary(max),
            @sha256 char(64), @skipped nvarchar(2000), @chosen_series varchar(64), @chosen_by nvarchar(128),
            @series_uid varchar(64), @series_reason nvarchar(400);
    DECLARE patients CURSOR LOCAL FAST_FORWARD FOR SELECT patient_id FROM #todo ORDER BY patient_id;
    OPEN patients;
    FETCH NEXT FROM patients INTO @patient_id;
    WHILE @@FETCH_STATUS = 0
    BEGIN
        SELECT @error = NULL, @n_slices = NULL, @n_groups = NULL, @dim = NULL, @data = NULL, @sha256 = NULL,
               @skipped = NULL, @series_uid = NULL, @series_reason = NULL, @chosen_series = NULL, @chosen_by = NULL;
        -- A DBA's choice of series for this patient, which overrides the rule.
        SELECT @chosen_series = series_instance_uid, @chosen_by = chosen_by
        FROM lungsql.series_choices WHERE patient_id = @patient_id;
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
from lungsql.server import mssql
(error, provider, n_slices, n_groups, dim, data, sha256, skipped, series_uid, series_reason) = \
    mssql.featurize_patient(InputDataSet, cnn_name, cnn_model, cnn_sha256, input_name, output_name,
                            preprocessing, chosen_series, chosen_by, cnn_source)
',
            @input_data_1 = N'
SELECT s.dicom, s.z_position, s.series_instance_uid, s.modality, s.frame_z, s.frames, s.slice_thickness,
       s.tilt_degrees, s.image_type, s.series_description, s.convolution_kernel
FROM lungsql.scans AS s
WHERE s.patient_id = @patient_id',
            @params = N'@patient_id nvarchar(64), @cnn_name nvarchar(100), @cnn_model varbinary(max),
                @cnn_sha256 char(64), @input_name nvarchar(256), @output_name nvarchar(256),
                @preprocessing nvarchar(max), @error nvarchar(max) OUTPUT, @provider nvarchar(100) OUTPUT,
                @n_slices int OUTPUT, @n_groups int OUTPUT, @dim int OUTPUT, @data varbinary(max) OUTPUT,
                @sha256 char(64) OUTPUT, @skipped nvarchar(2000) OUTPUT, @chosen_series varchar(64),
                @chosen_by nvarchar(128), @series_uid varchar(64) OUTPUT, @series_reason nvarchar(400) OUTPUT,
                @cnn_source nvarchar(max)',
            @patient_id = @patient_id,
            @cnn_name = @cnn_name,
            @cnn_model = @cnn_model,
            @cnn_sha256 = @cnn_sha256,
            @input_name = @input_name,
            @output_name = @output_name,
            @preprocessing = @preprocessing,
            @error = @error OUTPUT,
            @provider = @provider OUTPUT,
            @n_slices = @n_slices OUTPUT,
            @n_groups = @n_groups OUTPUT,
            @dim = @dim OUTPUT,
            @data = @data OUTPUT,
            @sha256 = @sha256 OUTPUT,
            @skipped = @skipped OUTPUT,
            @chosen_series = @chosen_series,
            @chosen_by = @chosen_by,
            @series_uid = @series_uid OUTPUT,
            @series_reason = @series_reason OUTPUT,
            @cnn_source = @cnn_source;
        IF @error IS NOT NULL
        BEGIN
            SET @message = LEFT(CONCAT(@error, NCHAR(10), N'(patient ''', @patient_id, N''')'), 2048);
            THROW 50000, @message, 1;
        END;
        IF @skipped IS NOT NULL  -- this patient cannot be featurized: record why, and go on
        BEGIN
            SET @failed += 1;
            BEGIN TRANSACTION;
                UPDATE lungsql.feature_failures WITH (UPDLOCK, SERIALIZABLE)
                SET run_id = @run_id, reason = @skipped, failed_at = SYSUTCDATETIME()
                WHERE patient_id = @patient_id AND cnn_id = @cnn_id;
                IF @@ROWCOUNT = 0
                    INSERT INTO lungsql.feature_failures (patient_id, cnn_id, run_id, reason)
                    VALUES (@patient_id, @cnn_id, @run_id, @skipped);
                UPDATE lungsql.feature_runs SET failed = @failed WHERE run_id = @run_id;
            COMMIT TRANSACTION;
            SET @message = LEFT(@skipped, 1000);
            RAISERROR (N'skipped patient %s: %s', 0, 1, @patient_id, @message) WITH NOWAIT;
            FETCH NEXT FROM patients INTO @patient_id;
            CONTINUE;
        END;

        SET @done += 1;
        SET @slices += @n_slices;
        SET @seconds = DATEDIFF_BIG(MICROSECOND, @started, SYSUTCDATETIME()) / 1e6;
        BEGIN TRANSACTION;
            UPDATE lungsql.features WITH (UPDLOCK, SERIALIZABLE)
            SET n_slices = @n_slices, n_groups = @n_groups, dim = @dim, data = @data, sha256 = @sha256,
                run_id = @run_id, created_at = SYSUTCDATETIME(), series_instance_uid = @series_uid,
                series_reason = @series_reason
            WHERE patient_id = @patient_id AND cnn_id = @cnn_id;
            IF @@ROWCOUNT = 0
                INSERT INTO lungsql.features (patient_id, cnn_id, n_slices, n_groups, dim, data, sha256, run_id,
                                              series_instance_uid, series_reason)
                VALUES (@patient_id, @cnn_id, @n_slices, @n_groups, @dim, @data, @sha256, @run_id, @series_uid,
                        @series_reason);
            DELETE FROM lungsql.feature_failures WHERE patient_id = @patient_id AND cnn_id = @cnn_id;
            UPDATE lungsql.feature_runs
            SET provider = @provider, patients = @done, slices = @slices, seconds = @seconds
            WHERE run_id = @run_id;
        COMMIT TRANSACTION;  -- this patient is done, whatever happens to the next

        SET @rate = CASE WHEN @seconds > 0 THEN CAST(ROUND(@slices / @seconds, 0) AS int) ELSE 0 END;
        RAISERROR (N'%d/%d patients, %d slices, %d slices/s', 0, 1, @done, @total, @slices, @rate) WITH NOWAIT;
        FETCH NEXT FROM patients INTO @patient_id;
    END;
    CLOSE patients;
    DEALLOCATE patients;

    SET @seconds = DATEDIFF_BIG(MICROSECOND, @started, SYSUTCDATETIME()) / 1e6;
    UPDATE lungsql.feature_runs SET seconds = @seconds, finished_at = SYSUTCDATETIME() WHERE run_id = @run_id;
    SET @provider = ISNULL(@provider, N'unknown');
    SET @message = CONVERT(nvarchar(30), CAST(@seconds AS decimal(12, 1)));
    RAISERROR (N'done: %d patients, %d slices in %s s on %s, run %I64d; %d skipped (lungsql.feature_failures)',
               0, 1, @done, @slices, @message, @provider, @run_id, @failed) WITH NOWAIT;
    SELECT @run_id AS run_id, @cnn_name AS cnn, @provider AS provider, @done AS patients, @slices AS slices,
           @seconds AS seconds;
END;
GO

-- Train a LightGBM classifier on the labelled patients' features. Returns the
-- new model's id and its validation metrics (JSON). The first model of a name
-- is deployed on its own; a later one only when its validation log loss is
-- lower than the deployed one's (lungsql.registry, as on PostgreSQL).
--
--   EXEC dbo.TrainLungCancerModel;
--   EXEC dbo.TrainLungCancerModel @ModelName = N'lightgbm', @Params = N'{"num_leaves": 7}';
CREATE OR ALTER PROCEDURE dbo.TrainLungCancerModel
    @ModelName nvarchar(100) = N'lightgbm',  -- the registry name
    @Params    nvarchar(max) = N'{}',        -- LightGBM parameters overriding lungsql's defaults (a JSON object)
    @CnnName   nvarchar(100) = NULL,         -- whose features; NULL: the newest CNN
    @ModelId   int = NULL OUTPUT             -- the new model's id
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @message nvarchar(2048);
    IF @ModelName IS NULL OR LTRIM(RTRIM(@ModelName)) = N''
        THROW 50001, N'lungsql: @ModelName must not be empty
Hint: e.g. @ModelName = N''lightgbm''', 1;
    SET @Params = ISNULL(@Params, N'{}');
    IF ISJSON(@Params) = 0 OR LEFT(LTRIM(@Params), 1) <> N'{'
        THROW 50001, N'lungsql: @Params must be a JSON object
Hint: e.g. @Params = N''{"num_leaves": 7}''', 1;

    DECLARE @cnn_id int, @cnn_name nvarchar(100);
    SELECT TOP (1) @cnn_id = cnn_id, @cnn_name = name
    FROM lungsql.cnn_models
    WHERE @CnnName IS NULL OR name = @CnnName
    ORDER BY created_at DESC, cnn_id DESC;
    IF @cnn_id IS NULL
    BEGIN
        SET @message = CONCAT(
            CASE WHEN @CnnName IS NULL THEN N'lungsql: no CNN is stored'
                 ELSE CONCAT(N'lungsql: no CNN named ''', @CnnName, N'''') END,
            NCHAR(10), N'Hint: import one: lungsql model import --builtin efficientnet-lite0');
        THROW 50002, @message, 1;
    END;
    DECLARE @patients int = (
        SELECT COUNT(*) FROM lungsql.features AS f JOIN lungsql.patients AS p ON p.patient_id = f.patient_id
        WHERE f.cnn_id = @cnn_id AND p.label IS NOT NULL);
    IF @patients = 0
    BEGIN
        SET @message = CONCAT(
            N'lungsql: no labelled patient has features from CNN ''', @cnn_name, N'''', NCHAR(10),
            N'Hint: load labels with `lungsql ingest --labels`, then EXEC dbo.GenerateFeatures');
        THROW 50002, @message, 1;
    END;
    RAISERROR (N'training ''%s'' on %d labelled patients (CNN ''%s'')', 0, 1,
               @ModelName, @patients, @cnn_name) WITH NOWAIT;

    DECLARE @error nvarchar(max), @model_text nvarchar(max), @model_sha256 char(64), @feature_set nvarchar(100),
            @used_params nvarchar(max), @metrics nvarchar(max), @feature_names nvarchar(max);
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from lungsql.server import mssql
(error, model_text, model_sha256, feature_set, used_params, metrics,
 feature_names) = mssql.train_model(InputDataSet, lightgbm_params)
',
        @input_data_1 = N'
SELECT f.patient_id, p.label, p.age_years, p.sex, f.data, f.n_groups, f.dim, f.n_slices, f.sha256
FROM lungsql.features AS f
JOIN lungsql.patients AS p ON p.patient_id = f.patient_id
WHERE f.cnn_id = @cnn_id AND p.label IS NOT NULL
ORDER BY f.patient_id',
        @params = N'@cnn_id int, @lightgbm_params nvarchar(max), @error nvarchar(max) OUTPUT,
            @model_text nvarchar(max) OUTPUT, @model_sha256 char(64) OUTPUT, @feature_set nvarchar(100) OUTPUT,
            @used_params nvarchar(max) OUTPUT, @metrics nvarchar(max) OUTPUT, @feature_names nvarchar(max) OUTPUT',
        @cnn_id = @cnn_id,
        @lightgbm_params = @Params,
        @error = @error OUTPUT,
        @model_text = @model_text OUTPUT,
        @model_sha256 = @model_sha256 OUTPUT,
        @feature_set = @feature_set OUTPUT,
        @used_params = @used_params OUTPUT,
        @metrics = @metrics OUTPUT,
        @feature_names = @feature_names OUTPUT;
    IF @error IS NOT NULL
    BEGIN
        SET @error = LEFT(@error, 2000);
        THROW 50000, @error, 1;
    END;

    -- Store the model and apply the registry rule (lungsql.registry.after_training) in one transaction.
    DECLARE @version int, @deploy_strategy nvarchar(100), @notice nvarchar(max);
    BEGIN TRANSACTION;
        -- One train or deploy of a name at a time, until COMMIT: consecutive versions.
        DECLARE @registry_lock nvarchar(255) = LEFT(CONCAT(N'lungsql.models:', @ModelName), 255);
        EXEC sp_getapplock @Resource = @registry_lock, @LockMode = N'Exclusive', @LockOwner = N'Transaction';
        SELECT @version = ISNULL(MAX(version), 0) + 1
        FROM lungsql.models WITH (UPDLOCK, HOLDLOCK)
        WHERE name = @ModelName;
        INSERT INTO lungsql.models (name, version, cnn_id, feature_set, feature_names, params, model_text, sha256,
                                    metrics)
        VALUES (@ModelName, @version, @cnn_id, @feature_set, @feature_names, @used_params, @model_text,
                @model_sha256, @metrics);
        SET @ModelId = SCOPE_IDENTITY();
        -- The name's models with their deployments (the new one among them): deploy it or not?
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
from lungsql.server import mssql
error, deploy_strategy, notice = mssql.after_training(InputDataSet, model_name, model_id)
',
            @input_data_1 = N'
SELECT m.model_id, m.metrics, d.deployment_id
FROM lungsql.models AS m
LEFT JOIN lungsql.deployments AS d ON d.model_id = m.model_id AND d.name = @model_name
WHERE m.name = @model_name',
            @params = N'@model_name nvarchar(100), @model_id int, @error nvarchar(max) OUTPUT,
                @deploy_strategy nvarchar(100) OUTPUT, @notice nvarchar(max) OUTPUT',
            @model_name = @ModelName,
            @model_id = @ModelId,
            @error = @error OUTPUT,
            @deploy_strategy = @deploy_strategy OUTPUT,
            @notice = @notice OUTPUT;
        IF @error IS NOT NULL
        BEGIN
            SET @error = LEFT(@error, 2000);
            THROW 50000, @error, 1;  -- XACT_ABORT: the model is not stored either
        END;
        IF @deploy_strategy IS NOT NULL
            INSERT INTO lungsql.deployments (name, model_id, strategy)
            VALUES (@ModelName, @ModelId, @deploy_strategy);
    COMMIT TRANSACTION;
    SET @message = LEFT(@notice, 2000);
    RAISERROR (N'%s', 0, 1, @message) WITH NOWAIT;
    SELECT @ModelId AS model_id, @metrics AS metrics;
END;
GO

-- Deploy a model of a name: 'best_score' (lowest validation log loss, the
-- newest on a tie), 'most_recent', 'rollback' (the previously deployed model
-- other than the current one) or a model id. Returns the deployed model's id.
-- lungsql.registry chooses, as lungsql.deploy does on PostgreSQL; a name
-- without models, an unknown strategy or nothing to roll back to is THROWn
-- as 50000 with a hint.
--
--   EXEC dbo.DeployLungCancerModel @ModelName = N'lightgbm', @Strategy = N'rollback';
CREATE OR ALTER PROCEDURE dbo.DeployLungCancerModel
    @ModelName nvarchar(100),                  -- the registry name
    @Strategy  nvarchar(100) = N'best_score',  -- 'best_score' | 'most_recent' | 'rollback' | a model id
    @ModelId   int = NULL OUTPUT               -- the deployed model's id
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @error nvarchar(max), @chosen int,
            @chosen_strategy nvarchar(100);  -- @Strategy as the deployment row records it
    SET @Strategy = ISNULL(@Strategy, N'best_score');
    BEGIN TRANSACTION;
        -- One train or deploy of a name at a time, until COMMIT: consecutive versions.
        DECLARE @registry_lock nvarchar(255) = LEFT(CONCAT(N'lungsql.models:', @ModelName), 255);
        EXEC sp_getapplock @Resource = @registry_lock, @LockMode = N'Exclusive', @LockOwner = N'Transaction';
        -- lungsql.registry.choose, as lungsql.deploy chooses on PostgreSQL, on the name's models
        -- with their deployments under the name.
        EXEC sp_execute_external_script
            @language = N'Python',
            @script = N'
from lungsql.server import mssql
error, chosen, chosen_strategy = mssql.choose_deployment(InputDataSet, model_name, deploy_strategy)
',
            @input_data_1 = N'
SELECT m.model_id, m.metrics, d.deployment_id
FROM lungsql.models AS m
LEFT JOIN lungsql.deployments AS d ON d.model_id = m.model_id AND d.name = @model_name
WHERE m.name = @model_name',
            @params = N'@model_name nvarchar(100), @deploy_strategy nvarchar(100), @error nvarchar(max) OUTPUT,
                @chosen int OUTPUT, @chosen_strategy nvarchar(100) OUTPUT',
            @model_name = @ModelName,
            @deploy_strategy = @Strategy,
            @error = @error OUTPUT,
            @chosen = @chosen OUTPUT,
            @chosen_strategy = @chosen_strategy OUTPUT;
        IF @error IS NOT NULL
        BEGIN
            SET @error = LEFT(@error, 2000);
            THROW 50000, @error, 1;
        END;
        INSERT INTO lungsql.deployments (name, model_id, strategy) VALUES (@ModelName, @chosen, @chosen_strategy);
    COMMIT TRANSACTION;
    SET @ModelId = @chosen;
    SELECT @chosen AS model_id;
END;
GO

-- The model that answers for a registry name (NULL: the most recently deployed
-- one) among the lung cancer models: the latest deployment row wins. Used by
-- both scoring procedures.
CREATE OR ALTER FUNCTION lungsql.DeployedModel (@ModelName nvarchar(100))
RETURNS TABLE
AS
RETURN (
    SELECT TOP (1) m.model_id, m.cnn_id, m.sha256, m.model_text
    FROM lungsql.deployments AS d
    JOIN lungsql.models AS m ON m.model_id = d.model_id
    WHERE (@ModelName IS NULL OR d.name = @ModelName) AND m.task = N'lung_cancer'
    ORDER BY d.deployment_id DESC
);
GO

-- The probability of lung cancer for a patient, from the deployed model, in
-- percent (0-100) as in the 2017 original. Recorded, as a probability (0-1),
-- in lungsql.predictions. This is a research tool, not a diagnosis.
--
--   DECLARE @p float;
--   EXEC dbo.PredictLungCancer @PatientId = N'0a0c32c9e08cc2ea76a71649de56be6d', @PredictionResult = @p OUTPUT;
--   SELECT @p AS cancer_probability_percent;
CREATE OR ALTER PROCEDURE dbo.PredictLungCancer
    @PatientId        nvarchar(64),          -- lungsql.patients.patient_id
    @ModelName        nvarchar(100) = NULL,  -- a registry name; NULL: the most recently deployed model
    @PredictionResult float = NULL OUTPUT    -- the probability of cancer in percent, 0-100
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @message nvarchar(2048);
    IF @PatientId IS NULL
        THROW 50001, N'lungsql: @PatientId is NULL
Hint: EXEC dbo.PredictLungCancer @PatientId = N''...'', @PredictionResult = @p OUTPUT', 1;

    DECLARE @model_id int, @cnn_id int, @model_sha256 char(64), @model_text nvarchar(max);
    SELECT @model_id = model_id, @cnn_id = cnn_id, @model_sha256 = sha256, @model_text = model_text
    FROM lungsql.DeployedModel(@ModelName);
    IF @model_id IS NULL
    BEGIN
        SET @message = CONCAT(N'lungsql: no model is deployed',
                              CASE WHEN @ModelName IS NULL THEN N'' ELSE CONCAT(N' as ''', @ModelName, N'''') END,
                              NCHAR(10), N'Hint: train one: EXEC dbo.TrainLungCancerModel');
        THROW 50002, @message, 1;
    END;

    DECLARE @error nvarchar(max), @probability float;
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from lungsql.server import mssql
error, probability = mssql.predict_one(InputDataSet, patient_id, model_id, model_sha256, model_text, cnn_id)
',
        @input_data_1 = N'
SELECT f.patient_id, p.age_years, p.sex, f.data, f.n_groups, f.dim, f.n_slices, f.sha256
FROM lungsql.features AS f
JOIN lungsql.patients AS p ON p.patient_id = f.patient_id
WHERE f.cnn_id = @cnn_id AND f.patient_id = @patient_id',
        @params = N'@patient_id nvarchar(64), @model_id int, @model_sha256 char(64), @model_text nvarchar(max),
            @cnn_id int, @error nvarchar(max) OUTPUT, @probability float OUTPUT',
        @patient_id = @PatientId,
        @model_id = @model_id,
        @model_sha256 = @model_sha256,
        @model_text = @model_text,
        @cnn_id = @cnn_id,
        @error = @error OUTPUT,
        @probability = @probability OUTPUT;
    IF @error IS NOT NULL
    BEGIN
        SET @error = LEFT(@error, 2000);
        THROW 50000, @error, 1;
    END;

    INSERT INTO lungsql.predictions (patient_id, model_id, probability) VALUES (@PatientId, @model_id, @probability);
    SET @PredictionResult = @probability * 100;
END;
GO

-- Many patients in one call: returns patient_id and probability (0-1), each
-- recorded in lungsql.predictions. The scores come back from Python as a JSON
-- OUTPUT parameter rather than through INSERT ... EXEC, so that you can keep
-- this procedure's result with INSERT INTO your_table EXEC dbo.PredictLungCancerBatch.
--
--   EXEC dbo.PredictLungCancerBatch;                                  -- every patient with features
--   EXEC dbo.PredictLungCancerBatch @PatientIds = N'["id1", "id2"]', @ModelName = N'lightgbm';
CREATE OR ALTER PROCEDURE dbo.PredictLungCancerBatch
    @PatientIds nvarchar(max) = NULL,      -- a JSON array of patient ids; NULL: every patient featurized by the model's CNN
    @ModelName  nvarchar(100) = NULL       -- a registry name; NULL: the most recently deployed model
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @message nvarchar(2048);
    IF @PatientIds IS NOT NULL AND (ISJSON(@PatientIds) = 0 OR LEFT(LTRIM(@PatientIds), 1) <> N'[')
        THROW 50001, N'lungsql: @PatientIds must be a JSON array of patient ids, or NULL for every patient
Hint: e.g. @PatientIds = N''["0a0c32c9e08cc2ea76a71649de56be6d"]''', 1;

    DECLARE @model_id int, @cnn_id int, @model_sha256 char(64), @model_text nvarchar(max);
    SELECT @model_id = model_id, @cnn_id = cnn_id, @model_sha256 = sha256, @model_text = model_text
    FROM lungsql.DeployedModel(@ModelName);
    IF @model_id IS NULL
    BEGIN
        SET @message = CONCAT(N'lungsql: no model is deployed',
                              CASE WHEN @ModelName IS NULL THEN N'' ELSE CONCAT(N' as ''', @ModelName, N'''') END,
                              NCHAR(10), N'Hint: train one: EXEC dbo.TrainLungCancerModel');
        THROW 50002, @message, 1;
    END;

    DECLARE @error nvarchar(max), @scores nvarchar(max);
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from lungsql.server import mssql
error, scores = mssql.predict_batch(InputDataSet, patient_ids, model_id, model_sha256, model_text, cnn_id)
',
        @input_data_1 = N'
SELECT f.patient_id, p.age_years, p.sex, f.data, f.n_groups, f.dim, f.n_slices, f.sha256
FROM lungsql.features AS f
JOIN lungsql.patients AS p ON p.patient_id = f.patient_id
WHERE f.cnn_id = @cnn_id
  AND (@patient_ids IS NULL OR f.patient_id IN (SELECT j.value FROM OPENJSON(@patient_ids) AS j))',
        @params = N'@patient_ids nvarchar(max), @model_id int, @model_sha256 char(64), @model_text nvarchar(max),
            @cnn_id int, @error nvarchar(max) OUTPUT, @scores nvarchar(max) OUTPUT',
        @patient_ids = @PatientIds,
        @model_id = @model_id,
        @model_sha256 = @model_sha256,
        @model_text = @model_text,
        @cnn_id = @cnn_id,
        @error = @error OUTPUT,
        @scores = @scores OUTPUT;
    IF @error IS NOT NULL
    BEGIN
        SET @error = LEFT(@error, 2000);
        THROW 50000, @error, 1;
    END;

    CREATE TABLE #scores (patient_id nvarchar(64) NOT NULL PRIMARY KEY, probability float NOT NULL);
    INSERT INTO #scores (patient_id, probability)
    SELECT s.patient_id, s.probability
    FROM OPENJSON(@scores) WITH (patient_id nvarchar(64) '$.patient_id', probability float '$.probability') AS s;
    INSERT INTO lungsql.predictions (patient_id, model_id, probability)
    SELECT patient_id, @model_id, probability FROM #scores;
    SELECT patient_id, probability FROM #scores ORDER BY patient_id;
END;
GO

-- The probability of each of the 14 findings on one radiograph, most probable
-- first, from the model deployed as @ModelName (default 'chest_xray14'); each
-- recorded in lungsql.finding_predictions. The image must have been featurized
-- with the model's CNN (on PostgreSQL: CALL lungsql.generate_features(task =>
-- 'chest_xray14')). This is a research tool, not a diagnosis.
--
--   EXEC dbo.PredictFindings @ImageId = 42;
CREATE OR ALTER PROCEDURE dbo.PredictFindings
    @ImageId   bigint,                              -- lungsql.radiographs.image_id
    @ModelName nvarchar(100) = N'chest_xray14'      -- a registry name of the chest_xray14 task
AS
BEGIN
    SET NOCOUNT ON;
    SET XACT_ABORT ON;
    DECLARE @message nvarchar(2048);
    IF @ImageId IS NULL
        THROW 50001, N'lungsql: @ImageId is NULL
Hint: EXEC dbo.PredictFindings @ImageId = 42', 1;

    DECLARE @model_id int, @cnn_id int, @model_sha256 char(64), @manifest nvarchar(max);
    SELECT TOP (1) @model_id = m.model_id, @cnn_id = m.cnn_id, @model_sha256 = m.sha256, @manifest = m.model_text
    FROM lungsql.deployments AS d
    JOIN lungsql.models AS m ON m.model_id = d.model_id
    WHERE d.name = COALESCE(@ModelName, N'chest_xray14') AND m.task = N'chest_xray14'
    ORDER BY d.deployment_id DESC;
    IF @model_id IS NULL
    BEGIN
        SET @message = CONCAT(N'lungsql: no radiograph model is deployed as ''', COALESCE(@ModelName, N'chest_xray14'),
                              N'''', NCHAR(10), N'Hint: train one on PostgreSQL: SELECT * FROM lungsql.train_findings()');
        THROW 50002, @message, 1;
    END;

    DECLARE @features varbinary(max), @features_sha256 char(64), @dim int;
    SELECT @features = f.data, @features_sha256 = f.sha256, @dim = f.dim
    FROM lungsql.image_features AS f
    WHERE f.image_id = @ImageId AND f.cnn_id = @cnn_id;
    IF @features IS NULL
    BEGIN
        SET @message = CONCAT(N'lungsql: radiograph ', @ImageId, N' has no features from the CNN of model ', @model_id,
                              NCHAR(10), N'Hint: check the image id, or featurize it on PostgreSQL: CALL lungsql.generate_features(task => ''chest_xray14'')');
        THROW 50002, @message, 1;
    END;

    DECLARE @error nvarchar(max), @findings nvarchar(max);
    EXEC sp_execute_external_script
        @language = N'Python',
        @script = N'
from lungsql.server import mssql
error, findings = mssql.predict_findings(InputDataSet, features, features_sha256, dim, model_id, model_sha256, manifest)
',
        @input_data_1 = N'
SELECT b.finding, b.model_text, b.sha256
FROM lungsql.model_boosters AS b
WHERE b.model_id = @model_id',
        @params = N'@features varbinary(max), @features_sha256 char(64), @dim int, @model_id int,
            @model_sha256 char(64), @manifest nvarchar(max), @error nvarchar(max) OUTPUT, @findings nvarchar(max) OUTPUT',
        @features = @features,
        @features_sha256 = @features_sha256,
        @dim = @dim,
        @model_id = @model_id,
        @model_sha256 = @model_sha256,
        @manifest = @manifest,
        @error = @error OUTPUT,
        @findings = @findings OUTPUT;
    IF @error IS NOT NULL
    BEGIN
        SET @error = LEFT(@error, 2000);
        THROW 50000, @error, 1;
    END;

    CREATE TABLE #findings (finding nvarchar(64) NOT NULL PRIMARY KEY, probability float NOT NULL);
    INSERT INTO #findings (finding, probability)
    SELECT s.finding, s.probability
    FROM OPENJSON(@findings) WITH (finding nvarchar(64) '$.finding', probability float '$.probability') AS s;
    INSERT INTO lungsql.finding_predictions (image_id, model_id, finding, probability)
    SELECT @ImageId, @model_id, finding, probability FROM #findings;
    SELECT finding, probability FROM #findings ORDER BY probability DESC, finding;
END;
GO
