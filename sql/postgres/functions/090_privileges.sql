-- Least privilege. Re-applied by every `lungsql init`, after the functions.
--
-- lungsql_web is the web app's role. It reads the models and their
-- deployments (the administrators' page) and users' names, roles and whether
-- they are disabled (each request's user); everything else goes through
-- functions that run with their owner's rights on a fixed search path:
-- patients without their outcome labels, slice references and pixels
-- (020_web.sql: web_search_patients, web_patient, web_slice_ref,
-- slice_image), signing in (sign_in: the password hashes never leave the
-- server), appending to the audit log (audit_append), scoring and deploying.
-- It cannot read outcome labels, DICOM files, features, password hashes or the
-- audit log, nor change models, features, users or audit rows.
-- It logs in with a password: on the local cluster `lungsql db start` sets one
-- (kept in $LUNGSQL_HOME/web-db.key); elsewhere the DBA sets it, e.g. with
-- psql's \password lungsql_web, which sends only the SCRAM verifier.

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
REVOKE ALL ON ALL TABLES IN SCHEMA lungsql FROM lungsql_web;  -- and column privileges (an earlier password_hash)
REVOKE ALL ON ALL SEQUENCES IN SCHEMA lungsql FROM lungsql_web;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA lungsql FROM lungsql_web;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA lungsql FROM lungsql_web;

GRANT USAGE ON SCHEMA lungsql TO lungsql_web;
GRANT SELECT ON lungsql.models, lungsql.deployments TO lungsql_web;
GRANT SELECT ON lungsql.model_comparison TO lungsql_web;
GRANT SELECT (user_id, username, role, disabled) ON lungsql.users TO lungsql_web;

-- Scoring and deployment run with the rights of their owner, on a fixed search path
-- (the functions of 020_web.sql declare it themselves).
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
ALTER FUNCTION lungsql.predict_findings(bigint, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION lungsql.predict_findings_batch(bigint[], text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
GRANT EXECUTE ON FUNCTION lungsql.predict_findings(bigint, text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.predict_findings_batch(bigint[], text) TO lungsql_web;

-- The web app's boundary (020_web.sql).
GRANT EXECUTE ON FUNCTION lungsql.web_search_patients(text, integer) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.web_patient(text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.web_slice_ref(text, integer) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.web_top_slices(text, integer) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.web_slice_heatmap(text, integer) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.slice_image(bigint, real, real) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.web_patient_radiographs(text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.web_radiograph(bigint) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.radiograph_image(bigint, real, real, integer) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.radiograph_heatmap(bigint, text, text) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.sign_in(text, text, text, integer, integer, integer, double precision,
                                          double precision) TO lungsql_web;
GRANT EXECUTE ON FUNCTION lungsql.audit_append(text, text, text, text, jsonb) TO lungsql_web;
