-- lungsql on SQL Server: who may do what. Run in the lungsql database after
-- 02_procedures.sql, as its owner (safe to run again).
--
-- Nobody needs sysadmin (the 2017 demo connected back to the server as sa).
-- Three database roles; add your users to them:
--
--   lungsql_pipeline  DBAs and jobs that run the pipeline: the dbo procedures,
--                     reading every lungsql table; changes go through the
--                     procedures only.
--   lungsql_loader    the upload (`lungsql ingest`) and `lungsql model import`:
--                     writes scans, patients, labels and CNNs; runs no Python.
--   lungsql_web       the web app: reads patients, scans, models and
--                     deployments, logs users in, appends to the audit log,
--                     scores and deploys through the procedures.
--
--   ALTER ROLE lungsql_pipeline ADD MEMBER [CONTOSO\dba1];
--
-- Both run Python through sp_execute_external_script, which SQL Server checks
-- against the caller, not the procedure's owner: hence EXECUTE ANY EXTERNAL
-- SCRIPT. That permission also lets a member run a Python script of their own
-- (isolated by Launchpad, without a connection to the database); grant the
-- roles to people and services you would let do that. The @input_data_1
-- queries are compiled on their own, like dynamic SQL, so the roles also read
-- the tables those queries select from.

IF DATABASE_PRINCIPAL_ID(N'lungsql_pipeline') IS NULL
    CREATE ROLE lungsql_pipeline AUTHORIZATION dbo;
GO
IF DATABASE_PRINCIPAL_ID(N'lungsql_loader') IS NULL
    CREATE ROLE lungsql_loader AUTHORIZATION dbo;
GO
IF DATABASE_PRINCIPAL_ID(N'lungsql_web') IS NULL
    CREATE ROLE lungsql_web AUTHORIZATION dbo;
GO

-- The pipeline.
GRANT EXECUTE ANY EXTERNAL SCRIPT TO lungsql_pipeline;
GRANT EXECUTE ON OBJECT::dbo.CheckLungSQLEnvironment TO lungsql_pipeline;
GRANT EXECUTE ON OBJECT::dbo.GenerateFeatures TO lungsql_pipeline;
GRANT EXECUTE ON OBJECT::dbo.TrainLungCancerModel TO lungsql_pipeline;
GRANT EXECUTE ON OBJECT::dbo.DeployLungCancerModel TO lungsql_pipeline;
GRANT EXECUTE ON OBJECT::dbo.PredictLungCancer TO lungsql_pipeline;
GRANT EXECUTE ON OBJECT::dbo.PredictLungCancerBatch TO lungsql_pipeline;
GRANT SELECT ON SCHEMA::lungsql TO lungsql_pipeline;
GO

-- The upload and the CNN import. Re-running an upload updates labels and
-- error rows; replacing a CNN deletes its features and featurization runs.
GRANT SELECT, INSERT, UPDATE ON OBJECT::lungsql.patients TO lungsql_loader;
GRANT SELECT, INSERT ON OBJECT::lungsql.scans TO lungsql_loader;
GRANT SELECT, INSERT, UPDATE ON OBJECT::lungsql.labels TO lungsql_loader;
GRANT SELECT, INSERT, UPDATE ON OBJECT::lungsql.ingest_runs TO lungsql_loader;
GRANT SELECT, INSERT, UPDATE ON OBJECT::lungsql.ingest_errors TO lungsql_loader;
GRANT SELECT, INSERT, DELETE ON OBJECT::lungsql.cnn_models TO lungsql_loader;
GRANT SELECT, DELETE ON OBJECT::lungsql.feature_runs TO lungsql_loader;
GRANT SELECT, DELETE ON OBJECT::lungsql.features TO lungsql_loader;
GO

-- The web app. It may add audit rows and read them, never change or delete them.
GRANT EXECUTE ANY EXTERNAL SCRIPT TO lungsql_web;
GRANT EXECUTE ON OBJECT::dbo.PredictLungCancer TO lungsql_web;
GRANT EXECUTE ON OBJECT::dbo.PredictLungCancerBatch TO lungsql_web;
GRANT EXECUTE ON OBJECT::dbo.DeployLungCancerModel TO lungsql_web;
GRANT SELECT ON OBJECT::lungsql.patients TO lungsql_web;
GRANT SELECT ON OBJECT::lungsql.scans TO lungsql_web;
GRANT SELECT ON OBJECT::lungsql.models TO lungsql_web;
GRANT SELECT ON OBJECT::lungsql.deployments TO lungsql_web;
GRANT SELECT ON OBJECT::lungsql.features TO lungsql_web;  -- read by the scoring procedures' input queries
GRANT SELECT (user_id, username, password_hash, role, disabled) ON OBJECT::lungsql.users TO lungsql_web;
GRANT SELECT, INSERT ON OBJECT::lungsql.audit_log TO lungsql_web;
GO
