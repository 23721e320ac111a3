-- The web app's boundary: everything the role lungsql_web may reach of the
-- patients, their scans, the users and the audit log, as functions.
--
-- lungsql_web has no privilege on lungsql.patients, lungsql.scans,
-- lungsql.labels, lungsql.users.password_hash or lungsql.audit_log
-- (090_privileges.sql). These functions run with their owner's rights on a
-- fixed search path, bind their arguments, and return only what a clinician's
-- page shows: no outcome label, no DICOM header, no password hash. Re-created
-- by every `lungsql init`; EXECUTE is granted to lungsql_web only.

-- Patients whose name contains `q` (any case) or whose ID starts with it, the
-- exact ID first, then by name; with the number of stored slices and the
-- number of matches in all (`total`, also beyond `lim`). LIKE metacharacters
-- in `q` match themselves.
--
--   SELECT * FROM lungsql.web_search_patients('fern', 50);
DROP FUNCTION IF EXISTS lungsql.web_search_patients(text, integer);  -- its columns grew (radiographs)
CREATE OR REPLACE FUNCTION lungsql.web_search_patients(
    q   text,                -- a part of the name, or the first characters of a patient ID
    lim integer DEFAULT 50   -- rows at most (0 to 1000)
)
RETURNS TABLE (patient_id text, name text, sex text, age_years real, slices bigint, exact_id boolean,
               total bigint, radiographs bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
WITH pattern AS (
    SELECT replace(replace(replace(lower(web_search_patients.q), '\', '\\'), '%', '\%'), '_', '\_') AS p
),
hits AS (
    SELECT pa.patient_id, pa.name, pa.sex, pa.age_years,
           lower(pa.patient_id) = lower(web_search_patients.q) AS exact_id,
           count(*) OVER () AS total
    FROM lungsql.patients pa, pattern
    WHERE lower(pa.name) LIKE '%' || pattern.p || '%' ESCAPE '\'
       OR lower(pa.patient_id) LIKE pattern.p || '%' ESCAPE '\'
    ORDER BY exact_id DESC, pa.name, pa.patient_id
    LIMIT least(greatest(web_search_patients.lim, 0), 1000)
)
SELECT h.patient_id, h.name, h.sex, h.age_years,
       (SELECT count(*) FROM lungsql.scans s WHERE s.patient_id = h.patient_id), h.exact_id, h.total,
       (SELECT count(*) FROM lungsql.radiographs r WHERE r.patient_id = h.patient_id)
FROM hits h
ORDER BY h.exact_id DESC, h.name, h.patient_id
$$;

-- One patient as the patient page shows it: no row for an unknown ID.
-- `slices` counts the stored slices; `rows` and `columns` are the largest
-- slice's size (NULL without slices).
--
--   SELECT * FROM lungsql.web_patient('0a0c32c9e08cc2ea76a71649de56be6d');
DROP FUNCTION IF EXISTS lungsql.web_patient(text);  -- its columns grew (radiographs)
CREATE OR REPLACE FUNCTION lungsql.web_patient(
    id text                  -- lungsql.patients.patient_id
)
RETURNS TABLE (patient_id text, name text, sex text, birth_date date, age_years real, slices bigint,
               rows integer, columns integer, radiographs bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
SELECT pa.patient_id, pa.name, pa.sex, pa.birth_date, pa.age_years, s.slices, s.rows, s.columns,
       (SELECT count(*) FROM lungsql.radiographs r WHERE r.patient_id = pa.patient_id)
FROM lungsql.patients pa
CROSS JOIN LATERAL (SELECT count(*) AS slices, max(sc.rows) AS rows, max(sc.columns) AS columns
                    FROM lungsql.scans sc WHERE sc.patient_id = pa.patient_id) s
WHERE pa.patient_id = web_patient.id
$$;

-- The patient's slice number `slice_index` (0-based) in the viewer's order
-- (series by series, each in z order): its scan_id and the hex SHA-256 of its
-- DICOM file (the slice image's ETag). No row beyond the last slice.
--
--   SELECT * FROM lungsql.web_slice_ref('0a0c32c9e08cc2ea76a71649de56be6d', 0);
CREATE OR REPLACE FUNCTION lungsql.web_slice_ref(
    id          text,        -- lungsql.patients.patient_id
    slice_index integer      -- 0 .. slices - 1
)
RETURNS TABLE (scan_id bigint, sha256 text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
SELECT sc.scan_id, encode(sc.sha256, 'hex')
FROM lungsql.scans sc
WHERE sc.patient_id = web_slice_ref.id AND web_slice_ref.slice_index >= 0
ORDER BY sc.series_instance_uid, sc.z_position, sc.sop_instance_uid
OFFSET greatest(web_slice_ref.slice_index, 0) LIMIT 1
$$;

-- The pixels of one stored slice (its first frame), in Hounsfield units
-- mapped through the window [window_low, window_high] to 0-255: rows x columns
-- bytes, row by row. Decoded inside the server under the LUNGSQL_MAX_* limits;
-- a slice that cannot be decoded raises an error saying why. No row for an
-- unknown scan_id. The DICOM header never leaves the server.
--
--   SELECT rows, columns, length(pixels) FROM lungsql.slice_image(1, -1000, 400);
CREATE OR REPLACE FUNCTION lungsql.slice_image(
    scan_id     bigint,                 -- lungsql.scans.scan_id (from lungsql.web_slice_ref)
    window_low  real DEFAULT -1000,     -- HU shown as black
    window_high real DEFAULT 400        -- HU shown as white; above window_low
)
RETURNS TABLE (rows integer, columns integer, pixels bytea)
LANGUAGE plpython3u STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.slice_image(plpy, scan_id, window_low, window_high)
$$;

-- One sign-in attempt to the web app, throttled and audited in the caller's
-- transaction (commit right after). It takes transaction-level advisory
-- locks on the user name (any case) and the address, so concurrent attempts
-- for either wait for each other and each counts the ones before it. When the
-- recent failures of the name from the address, of the name from anywhere, or
-- from the address reach their limit, the attempt is audited as
-- 'login_locked' and answered 'locked' with the seconds to wait, without
-- checking the password and alike for names that exist or not. Otherwise it
-- is audited as 'login_failed' first, the password is checked (scrypt; a
-- dummy hash for unknown names, so both take as long), and on success that
-- row becomes 'login'. A disabled user fails like a wrong password. After a
-- limit is reached, the next attempt must wait base_delay_s after the latest
-- failure, doubled for each failure beyond the limit (at most window_s).
--
--   outcome 'ok': user_id and role are set; 'failed': retry_after is the wait
--   now imposed (0: none); 'locked': retry_after is the wait left.
--
--   SELECT * FROM lungsql.sign_in('alice', 'her password', '10.0.0.7');
CREATE OR REPLACE FUNCTION lungsql.sign_in(
    username                 text,                         -- as typed
    password                 text,                         -- as typed: checked, never stored
    address                  text,                         -- the client's address (NULL: counted per name only)
    max_failures             integer DEFAULT 5,            -- per name and address, since its last sign-in there (1-100)
    max_failures_per_user    integer DEFAULT 20,           -- per name, from every address (1-1000)
    max_failures_per_address integer DEFAULT 50,           -- per address, for every name (1-10000)
    window_s                 double precision DEFAULT 600, -- failures older than this are forgotten (60-86400)
    base_delay_s             double precision DEFAULT 30   -- the first wait (1 to window_s)
)
RETURNS TABLE (outcome text, user_id integer, role text, retry_after integer)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.sign_in(plpy, username, password, address, max_failures, max_failures_per_user,
                          max_failures_per_address, window_s, base_delay_s)
$$;

-- Appends one row to lungsql.audit_log (the web app's only way to it) and
-- returns its audit_id. Sign-in rows ('login', 'login_failed',
-- 'login_locked') are written by lungsql.sign_in alone, so that nobody can
-- forge the rows the throttling counts.
--
--   SELECT lungsql.audit_append('alice', 'view_patient', 'p1', '10.0.0.7', '{"via": "web"}');
CREATE OR REPLACE FUNCTION lungsql.audit_append(
    username   text,                  -- the signed-in user (NULL: nobody)
    action     text,                  -- 'logout' | 'view_patient' | 'view_radiograph' | 'score_patient'
                                      -- | 'score_failed' | 'deploy' | 'deploy_failed'
    patient_id text  DEFAULT NULL,    -- the patient concerned, if any
    address    text  DEFAULT NULL,    -- the client's address
    detail     jsonb DEFAULT '{}'     -- a JSON object
)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id bigint;
BEGIN
    IF audit_append.action IS NULL OR audit_append.action NOT IN
            ('logout', 'view_patient', 'view_radiograph', 'score_patient', 'score_failed', 'deploy',
             'deploy_failed') THEN
        RAISE EXCEPTION 'lungsql: % is not an audit action lungsql.audit_append records',
                        coalesce(quote_literal(audit_append.action), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use logout, view_patient, view_radiograph, score_patient, score_failed, deploy or '
                         'deploy_failed; '
                         'sign-ins are audited by lungsql.sign_in';
    END IF;
    IF audit_append.detail IS NOT NULL AND jsonb_typeof(audit_append.detail) <> 'object' THEN
        RAISE EXCEPTION 'lungsql: the audit detail must be a JSON object, not %', jsonb_typeof(audit_append.detail)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO lungsql.audit_log (username, action, patient_id, address, detail)
    VALUES (audit_append.username, audit_append.action, audit_append.patient_id, audit_append.address,
            coalesce(audit_append.detail, '{}'))
    RETURNING audit_id INTO new_id;
    RETURN new_id;
END
$$;

-- The slices that weighed most towards a higher probability, for the viewer:
-- each slice's index in the viewer's order (as web_slice_ref numbers them) and
-- its group's rank and contribution (log-odds, lungsql.explain_prediction;
-- negative when even the top groups lowered the probability), for the `lim`
-- most contributing groups.
--
--   SELECT * FROM lungsql.web_top_slices('0a0c32c9e08cc2ea76a71649de56be6d', 3);
CREATE OR REPLACE FUNCTION lungsql.web_top_slices(
    id  text,                -- lungsql.patients.patient_id
    lim integer DEFAULT 3    -- groups of slices, 1 .. 20
)
RETURNS TABLE (slice_index integer, rank integer, contribution double precision)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
WITH numbered AS (
    SELECT sc.scan_id,
           (row_number() OVER (ORDER BY sc.series_instance_uid, sc.z_position, sc.sop_instance_uid) - 1)::integer AS idx
    FROM lungsql.scans sc
    WHERE sc.patient_id = web_top_slices.id
),
top AS (
    SELECT e.rank, e.contribution, e.scan_ids
    FROM lungsql.explain_prediction(web_top_slices.id) e
    WHERE e.part = 'group'
    ORDER BY e.rank
    LIMIT least(greatest(web_top_slices.lim, 1), 20)
)
SELECT n.idx, t.rank, t.contribution
FROM top t
CROSS JOIN LATERAL unnest(t.scan_ids) AS s(scan_id)
JOIN numbered n ON n.scan_id = s.scan_id
ORDER BY t.rank, n.idx
$$;

-- The heat map of the patient's slice number `slice_index` (the viewer's
-- numbering, as web_slice_ref), for the deployed model: lungsql.slice_heatmap,
-- with the model and the slice's SHA-256 to key a cache. No row beyond the last
-- slice, or for a slice outside the featurized series.
--
--   SELECT rows, columns, model_id FROM lungsql.web_slice_heatmap('0a0c32c9e08cc2ea76a71649de56be6d', 0);
CREATE OR REPLACE FUNCTION lungsql.web_slice_heatmap(
    id          text,        -- lungsql.patients.patient_id
    slice_index integer      -- 0 .. slices - 1
)
RETURNS TABLE (rows integer, columns integer, heat bytea, model_id integer, sha256 text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
SELECT h.rows, h.columns, h.heat, h.model_id, r.sha256
FROM lungsql.web_slice_ref(web_slice_heatmap.id, web_slice_heatmap.slice_index) r
JOIN lungsql.features f ON f.patient_id = web_slice_heatmap.id
JOIN lungsql.scans s ON s.scan_id = r.scan_id AND s.series_instance_uid = f.series_instance_uid
CROSS JOIN LATERAL lungsql.slice_heatmap(web_slice_heatmap.id, r.scan_id) h
WHERE f.cnn_id = (SELECT m.cnn_id FROM lungsql.deployments d JOIN lungsql.models m USING (model_id)
                  WHERE m.task = 'lung_cancer' ORDER BY d.deployment_id DESC LIMIT 1)
$$;
