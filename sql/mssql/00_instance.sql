-- lungsql on SQL Server: once per instance, as sysadmin, before the database scripts.
--
-- 1. Lets the instance run Python (sp_execute_external_script).
-- 2. Gives the featurization job its own share of CPU and memory for Python:
--    an external resource pool, a workload group using it, and a classifier
--    that sends the job's sessions there. Resource Governor is an Enterprise
--    (and Developer) Edition feature; on other editions only step 1 applies,
--    and the default external pool (20 % of memory) serves everything.
--
-- Safe to run again. Resource Governor statements are written as EXEC of a
-- constant string: it is the same statement, in a form every T-SQL parser reads.

USE master;
GO

-- 1. External scripts.
EXEC sp_configure 'external scripts enabled', 1;
RECONFIGURE WITH OVERRIDE;
GO
-- value_in_use must be 1. SQL Server 2016 and 2017 need a restart of the
-- SQL Server service (Launchpad restarts with it) before it takes effect.
SELECT name, value, value_in_use FROM sys.configurations WHERE name = N'external scripts enabled';
GO

-- 2. The featurization job's resources. Featurizing runs ONNX Runtime on one
-- patient's slices at a time (a few hundred MB); adjust the percentages to
-- your server. Check them with:
--   SELECT * FROM sys.resource_governor_external_resource_pools;
IF NOT EXISTS (SELECT 1 FROM sys.resource_governor_external_resource_pools WHERE name = N'lungsql_featurize')
    EXEC (N'CREATE EXTERNAL RESOURCE POOL lungsql_featurize WITH (MAX_CPU_PERCENT = 50, MAX_MEMORY_PERCENT = 30)');
IF NOT EXISTS (SELECT 1 FROM sys.resource_governor_workload_groups WHERE name = N'lungsql_featurize')
    EXEC (N'CREATE WORKLOAD GROUP lungsql_featurize WITH (IMPORTANCE = LOW) USING [default], EXTERNAL lungsql_featurize');
GO

-- Sessions of the login lungsql_featurizer (create it for the SQL Agent job
-- that runs dbo.GenerateFeatures), or of a client that sets the application
-- name 'lungsql featurize', run in that group; everything else as before.
IF OBJECT_ID(N'dbo.lungsql_classifier', N'FN') IS NULL
    EXEC (N'CREATE FUNCTION dbo.lungsql_classifier()
RETURNS sysname
WITH SCHEMABINDING
AS
BEGIN
    IF SUSER_SNAME() = N''lungsql_featurizer'' OR APP_NAME() = N''lungsql featurize''
        RETURN N''lungsql_featurize'';
    RETURN N''default'';
END');
GO

-- An instance has one classifier function. If yours already has one, this
-- leaves it in place: add the test of dbo.lungsql_classifier to it instead.
DECLARE @classifier int = (SELECT classifier_function_id FROM sys.resource_governor_configuration);
IF @classifier = 0
    EXEC (N'ALTER RESOURCE GOVERNOR WITH (CLASSIFIER_FUNCTION = dbo.lungsql_classifier)');
ELSE IF @classifier <> OBJECT_ID(N'dbo.lungsql_classifier')
    PRINT N'This instance already has a classifier function: add the test of dbo.lungsql_classifier to it.';
EXEC (N'ALTER RESOURCE GOVERNOR RECONFIGURE');
GO
