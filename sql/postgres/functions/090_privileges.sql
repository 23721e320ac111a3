-- Least privilege. Re-applied by every `lungsql init`, after the functions.
--
-- lungsql_web is the web app's role: it reads patients and scans, the models
-- and their deployments (to show them), users' names, roles and password
-- hashes (to log them in); it appends to and reads the audit log; and it
-- executes the scoring and deployment functions, which run with their
-- owner's rights. It cannot change models, features, users or audit rows.
-- Give it a password for TCP connections: ALTER ROLE lungsql_web PASSWORD '...'.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'lungsql_web') THEN
        CREATE ROLE lungsql_web LOGIN;
    END IF;
END
$$;

-- Functions are executable by PUBLIC by default: not these.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA lungsql FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA lungsql FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA lungsql FROM lungsql_web;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA lungsql FROM lungsql_web;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA lungsql FROM lungsql_web;

GRANT USAGE ON SCHEMA lungsql TO lungsql_web;
GRANT SELECT ON lungsql.patients, lungsql.scans, lungsql.models, lungsql.deployments TO lungsql_web;
GRANT SELECT (user_id, username, password_hash, role, disabled) ON lungsql.users TO lungsql_web;
GRANT SELECT, INSERT ON lungsql.audit_log TO lungsql_web;

-- Scoring and deployment run with the rights of their owner, on a fixed search path.
ALTER FUNCTION lungsql.predict_lung_cancer(text, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION lungsql.predict_lung_cancer_batch(text[], text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION lungsql.predict_lung_cancer_detail(text, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION lungsql.warm_up(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION lungsql.deploy(text, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
GRANT EXECUTE ON FUNCTION lungsql.predict_lung_cancer(text, text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.predict_lung_cancer_batch(text[], text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.predict_lung_cancer_detail(text, text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.warm_up(text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.deploy(text, text) TO lungsql_web;
