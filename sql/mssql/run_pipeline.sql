-- lungsql: the pipeline, step by step, in SSMS.
--
-- Open this file in SSMS, connected to the lungsql database as a member of
-- lungsql_pipeline. Select one step (from its comment to the next GO) and
-- press F5. Progress lines appear in the Messages tab while a step runs;
-- a step cancelled with Alt+Break keeps what it finished, and running it
-- again continues where it stopped.
--
-- Before the first run (README.md in this folder): 00_instance.sql once per
-- instance, 01_schema.sql, 02_procedures.sql and 03_security.sql in the
-- database, and lungsql installed into the instance's Python runtime.
--
-- lungsql is a research tool. Its output is not a diagnosis.

-- 0. What Python inside SQL Server is, and whether it sees lungsql and its
--    dependencies (numpy, pydicom, onnxruntime, lightgbm, cv2).
EXEC sp_execute_external_script
    @language = N'Python',
    @script = N'
import sys
print(sys.version)
print(sys.executable)
';
EXEC dbo.CheckLungSQLEnvironment;
GO

-- 1. Scans and the CNN arrive from a workstation or server with lungsql
--    installed (the upload reads DICOM files; the CNN is exported once):
--
--      lungsql --db "mssql+pyodbc://sql01/lungsql?driver=ODBC+Driver+18+for+SQL+Server&trusted_connection=yes" ingest D:\dsb2017\stage1 --labels D:\dsb2017\stage1_labels.csv
--      lungsql --db "..." model import --builtin efficientnet-lite0
--
--    What arrived:
SELECT COUNT(*) AS patients, COUNT(label) AS labelled, SUM(label) AS with_cancer FROM lungsql.patients;
SELECT COUNT(*) AS slices, SUM(CAST(DATALENGTH(dicom) AS bigint)) / 1048576 AS megabytes FROM lungsql.scans;
SELECT TOP (10) run_id, source_dir, files_seen, stored, skipped, errors, seconds FROM lungsql.ingest_runs
ORDER BY run_id DESC;
SELECT cnn_id, name, feature_dim, DATALENGTH(model) AS onnx_bytes, sha256, created_at FROM lungsql.cnn_models;
GO

-- 2. CNN features of every patient not featurized yet (about a second per
--    patient of 50 slices on one core). To share the work between sessions,
--    run @Shard = 0 and @Shard = 1 with @Shards = 2 in two query windows.
EXEC dbo.GenerateFeatures;
-- EXEC dbo.GenerateFeatures @Shard = 0, @Shards = 2;
-- EXEC dbo.GenerateFeatures @OnlyMissing = 0;       -- featurize everyone again
SELECT TOP (5) run_id, provider, shard, shards, patients, slices, seconds, finished_at
FROM lungsql.feature_runs
ORDER BY run_id DESC;
GO

-- 3. A LightGBM classifier on the labelled patients. The first model of a
--    name is deployed; a later one only when it validates better.
DECLARE @ModelId int;
EXEC dbo.TrainLungCancerModel @ModelName = N'lightgbm', @ModelId = @ModelId OUTPUT;
-- EXEC dbo.TrainLungCancerModel @ModelName = N'lightgbm', @Params = N'{"num_leaves": 7}';
SELECT model_id, name, version,
       CAST(JSON_VALUE(metrics, N'$.auc') AS float) AS validation_auc,
       CAST(JSON_VALUE(metrics, N'$.log_loss') AS float) AS validation_log_loss,
       trained_at
FROM lungsql.models
ORDER BY model_id DESC;
GO

-- 4. The registry: which model answers for a name.
-- EXEC dbo.DeployLungCancerModel @ModelName = N'lightgbm', @Strategy = N'rollback';
-- EXEC dbo.DeployLungCancerModel @ModelName = N'lightgbm', @Strategy = N'most_recent';
EXEC dbo.DeployLungCancerModel @ModelName = N'lightgbm', @Strategy = N'best_score';
SELECT TOP (10) d.deployment_id, d.name, d.model_id, m.version, d.strategy, d.deployed_at
FROM lungsql.deployments AS d
JOIN lungsql.models AS m ON m.model_id = d.model_id
ORDER BY d.deployment_id DESC;
GO

-- 5. One patient, as in the 2017 demo: the probability of cancer in percent.
DECLARE @PatientId nvarchar(64) = (SELECT TOP (1) patient_id FROM lungsql.features ORDER BY patient_id);
DECLARE @PredictionResult float;
EXEC dbo.PredictLungCancer @PatientId = @PatientId, @ModelName = N'lightgbm',
     @PredictionResult = @PredictionResult OUTPUT;
SELECT @PatientId AS patient_id, @PredictionResult AS cancer_probability_percent;
GO

-- 6. Many patients: every featurized patient, or a JSON array of ids.
EXEC dbo.PredictLungCancerBatch @ModelName = N'lightgbm';
DECLARE @PatientIds nvarchar(max);
SELECT @PatientIds = N'[' + STRING_AGG(N'"' + STRING_ESCAPE(patient_id, 'json') + N'"', N',') + N']'
FROM (SELECT TOP (3) patient_id FROM lungsql.patients ORDER BY patient_id) AS first_three;
EXEC dbo.PredictLungCancerBatch @PatientIds = @PatientIds, @ModelName = N'lightgbm';
GO

-- 7. What was scored, most recent first.
SELECT TOP (20) p.prediction_id, p.patient_id, pt.name, p.probability, m.name AS model, m.version, p.predicted_at
FROM lungsql.predictions AS p
JOIN lungsql.patients AS pt ON pt.patient_id = p.patient_id
JOIN lungsql.models AS m ON m.model_id = p.model_id
ORDER BY p.prediction_id DESC;
GO
