-- The in-database pipeline: featurize, train, deploy, score.
--
-- Each body is a thin shell around one function of lungsql.server.procedures, which
-- reads and writes the tables through plpy in this backend: no connection
-- back to the database, no credentials in the server.

-- Featurize the patients' CT slices with a CNN stored in lungsql.cnn_models.
-- Each patient is committed on its own: a cancelled run keeps the patients it
-- finished, and a rerun continues where it stopped. A patient that cannot be
-- featurized (an undecodable slice, say) is recorded in lungsql.feature_failures
-- and skipped; the run goes on and its last NOTICE names the skipped patients.
-- NOTICE lines report progress; lungsql.feature_runs keeps the run, and the
-- next run marks a run whose session died as 'killed'.
--
--   CALL lungsql.generate_features();
--   CALL lungsql.generate_features(shard => 0, shards => 2);  -- and shard => 1 in another session
--   CALL lungsql.generate_features(retry_failed => true);     -- after fixing the patients that failed
--   CALL lungsql.generate_features(task => 'chest_xray14');   -- the radiographs, image by image
--
-- With task => 'chest_xray14' the stored radiographs are featurized instead (the
-- whole image resized, no CT window), a batch of images committed at a time;
-- an image that cannot be featurized goes to lungsql.image_feature_failures.
CREATE OR REPLACE PROCEDURE lungsql.generate_features(
    cnn_name     text    DEFAULT NULL,   -- a name in lungsql.cnn_models; NULL: the newest CNN
    only_missing boolean DEFAULT true,   -- false: featurize every patient again
    shard        integer DEFAULT 0,      -- this session's part, 0 .. shards-1
    shards       integer DEFAULT 1,      -- number of sessions sharing the work
    retry_failed boolean DEFAULT false,  -- true: also the patients in lungsql.feature_failures
    task         text    DEFAULT 'lung_cancer'  -- a task of lungsql.tasks: 'lung_cancer' or 'chest_xray14'
)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
procedures.generate_features(plpy, cnn_name, only_missing, shard, shards, retry_failed, task)
$$;

-- Train a LightGBM classifier on the labelled patients' features. Returns the
-- new model's id and its validation metrics. The first model of a name is
-- deployed on its own; a later one only when its validation log loss is lower.
--
--   SELECT * FROM lungsql.train_model();
--   SELECT * FROM lungsql.train_model('lightgbm', '{"num_leaves": 7}');
CREATE OR REPLACE FUNCTION lungsql.train_model(
    model_name text  DEFAULT 'lightgbm',   -- the registry name
    params     jsonb DEFAULT '{}',         -- LightGBM parameters overriding lungsql's defaults
    cnn_name   text  DEFAULT NULL          -- whose features; NULL: the newest CNN
)
RETURNS TABLE (model_id integer, metrics jsonb)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.train_model(plpy, model_name, params, cnn_name)
$$;

-- Deploy a model of a name: 'best_score' (lowest validation log loss),
-- 'most_recent', 'rollback' (the previously deployed model) or a model id.
-- Returns the deployed model's id.
--
--   SELECT lungsql.deploy('lightgbm', 'rollback');
CREATE OR REPLACE FUNCTION lungsql.deploy(
    model_name text,                     -- the registry name
    strategy   text DEFAULT 'best_score' -- 'best_score' | 'most_recent' | 'rollback' | a model id
)
RETURNS integer
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.deploy(plpy, model_name, strategy)
$$;

-- The probability (0-1) of lung cancer for a patient, from the deployed
-- model. Recorded in lungsql.predictions. This is a research tool, not a diagnosis.
--
--   SELECT lungsql.predict_lung_cancer('0a0c32c9e08cc2ea76a71649de56be6d');
CREATE OR REPLACE FUNCTION lungsql.predict_lung_cancer(
    patient_id text,                   -- lungsql.patients.patient_id
    model_name text DEFAULT NULL       -- NULL: the most recently deployed model
)
RETURNS double precision
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.predict_one(plpy, patient_id, model_name)
$$;

-- The probability for one patient and the deployed model that gave it, in one
-- call, for callers that show which model answered (the web app): the model
-- named is the model used, even while another one is being deployed.
--
--   SELECT * FROM lungsql.predict_lung_cancer_detail('0a0c32c9e08cc2ea76a71649de56be6d');
CREATE OR REPLACE FUNCTION lungsql.predict_lung_cancer_detail(
    patient_id text,                   -- lungsql.patients.patient_id
    model_name text DEFAULT NULL       -- NULL: the most recently deployed model
)
RETURNS TABLE (probability double precision, model_id integer, name text, version integer,
               trained_at timestamptz, auc double precision, deployment_name text, strategy text,
               deployed_at timestamptz)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.predict_detail(plpy, patient_id, model_name)
$$;

-- Loads Python, lungsql and the deployed model (parsed, its SHA-256 checked)
-- into this session without scoring anyone, so that the session's first score
-- is as fast as the next ones. Returns the deployed model's id (NULL: none).
-- The web app calls it on each connection of its pool when it starts.
CREATE OR REPLACE FUNCTION lungsql.warm_up(
    model_name text DEFAULT NULL       -- NULL: the most recently deployed model
)
RETURNS integer
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.warm_up(plpy, model_name)
$$;

-- Many patients in one call.
--
--   SELECT * FROM lungsql.predict_lung_cancer_batch(ARRAY(SELECT patient_id FROM lungsql.patients));
CREATE OR REPLACE FUNCTION lungsql.predict_lung_cancer_batch(
    patient_ids text[],                -- lungsql.patients.patient_id values
    model_name  text DEFAULT NULL      -- NULL: the most recently deployed model
)
RETURNS TABLE (patient_id text, probability double precision)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.predict_many(plpy, patient_ids, model_name)
$$;

-- Choose the series a patient is featurized from, over the rule of
-- lungsql.dicom.series (localizers, reformats and tilted series left out, then
-- the thinnest slices with enough coverage); NULL goes back to the rule. The
-- patient's features came from another series, so they are deleted, and the
-- next CALL lungsql.generate_features() featurizes the patient again.
--
--   SELECT * FROM lungsql.series WHERE patient_id = 'p0001';
--   CALL lungsql.choose_series('p0001', '1.2.840.113619.2.55.3.2');
--   CALL lungsql.choose_series('p0001', NULL);   -- back to the rule
CREATE OR REPLACE PROCEDURE lungsql.choose_series(patient_id text, series_instance_uid text)
LANGUAGE plpgsql AS $$
DECLARE
    removed integer;
BEGIN
    IF NOT EXISTS (SELECT FROM lungsql.patients AS p WHERE p.patient_id = choose_series.patient_id) THEN
        RAISE EXCEPTION 'lungsql: no patient %', quote_literal(choose_series.patient_id)
            USING HINT = 'SELECT patient_id FROM lungsql.patients';
    END IF;
    IF series_instance_uid IS NULL THEN
        DELETE FROM lungsql.series_choices AS c WHERE c.patient_id = choose_series.patient_id;
    ELSIF NOT EXISTS (SELECT FROM lungsql.scans AS s WHERE s.patient_id = choose_series.patient_id
                      AND s.series_instance_uid = choose_series.series_instance_uid) THEN
        RAISE EXCEPTION 'lungsql: patient % has no series %', quote_literal(choose_series.patient_id),
            quote_literal(choose_series.series_instance_uid)
            USING HINT = 'SELECT series_instance_uid, slices, coverage_mm FROM lungsql.series WHERE patient_id = '
                         || quote_literal(choose_series.patient_id);
    ELSE
        INSERT INTO lungsql.series_choices AS c (patient_id, series_instance_uid)
        VALUES (choose_series.patient_id, choose_series.series_instance_uid)
        ON CONFLICT ON CONSTRAINT series_choices_pkey DO UPDATE
            SET series_instance_uid = EXCLUDED.series_instance_uid, chosen_by = current_user, chosen_at = now();
    END IF;
    DELETE FROM lungsql.features AS f
    WHERE f.patient_id = choose_series.patient_id
      AND f.series_instance_uid IS DISTINCT FROM choose_series.series_instance_uid;
    GET DIAGNOSTICS removed = ROW_COUNT;
    DELETE FROM lungsql.feature_failures AS ff WHERE ff.patient_id = choose_series.patient_id;
    RAISE NOTICE 'patient %: %; % feature row(s) from another series deleted, CALL lungsql.generate_features() next',
        choose_series.patient_id,
        coalesce('series ' || choose_series.series_instance_uid || ' chosen', 'back to the rule'), removed;
END
$$;

-- Why the deployed model gives a patient its probability: each group of three
-- slices of the featurized series with its contribution (exact TreeSHAP of the
-- LightGBM model, carried back to the groups the features came from; see
-- lungsql.ml.explain), the most contributing first, then the parts that belong
-- to the patient and no group (log_slices, age_years, sex_male) and the model's
-- bias. Contributions are in log-odds and add up to the logit of the
-- probability; a positive one moves the probability up. An ensemble is
-- explained by its member of the largest weight: model_id and probability are
-- then that member's.
--
--   SELECT rank, first_slice, last_slice, round(contribution::numeric, 3)
--   FROM lungsql.explain_prediction('0a0c32c9e08cc2ea76a71649de56be6d') WHERE part = 'group' LIMIT 5;
CREATE OR REPLACE FUNCTION lungsql.explain_prediction(
    patient_id text,                   -- lungsql.patients.patient_id
    model_name text DEFAULT NULL       -- NULL: the most recently deployed model
)
RETURNS TABLE (part text, rank integer, group_index integer, first_slice integer, last_slice integer,
               z_from double precision, z_to double precision, scan_ids bigint[], contribution double precision,
               probability double precision, model_id integer, series_instance_uid text)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.explain_prediction(plpy, patient_id, model_name)
$$;

-- Deploy several trained models as one (lungsql.ml.ensemble): mean, weighted
-- (weights given, or each member's validation AUC above 0.5), hard_vote (the
-- share of members at or above 0.5) or max. The ensemble is stored as a model
-- of `name`, measured on its members' common validation patients (the members'
-- own figures on those patients go with it), deployed at once, and scored like
-- any model: lungsql.predict_lung_cancer(patient_id, name). Returns its model_id.
--
--   SELECT lungsql.deploy_ensemble('ensemble', ARRAY[1, 2, 3], method => 'hard_vote');
CREATE OR REPLACE FUNCTION lungsql.deploy_ensemble(
    name      text,                             -- the registry name it is deployed as
    model_ids integer[],                        -- two or more lungsql.models.model_id
    method    text DEFAULT 'mean',              -- mean | weighted | hard_vote | max
    weights   double precision[] DEFAULT NULL   -- with 'weighted': one per member
)
RETURNS integer
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.deploy_ensemble(plpy, name, model_ids, method, weights)
$$;

-- Where in a slice the probability comes from: the class-activation map of the
-- group of slices that holds stored file `scan_id` (the CNN's last feature map
-- weighted by that group's contributions, lungsql.ml.heatmap; for a CNN without
-- a feature map output, occlusion sensitivity: a 7 x 7 grid of cells blanked one
-- at a time in one batch of forward passes), over the file's pixels: rows x columns bytes, 255 where the features that raised the
-- probability were strongest, 0 where none were. An aid to reading the scan,
-- not a diagnosis.
--
--   SELECT rows, columns, group_index, contribution FROM lungsql.slice_heatmap('0a0c32c9...', 1234);
DROP FUNCTION IF EXISTS lungsql.slice_heatmap(text, bigint, text);  -- its columns grew: no OR REPLACE
CREATE FUNCTION lungsql.slice_heatmap(
    patient_id text,                   -- lungsql.patients.patient_id
    scan_id    bigint,                 -- one of lungsql.explain_prediction(patient_id).scan_ids
    model_name text DEFAULT NULL       -- NULL: the most recently deployed model
)
RETURNS TABLE (rows integer, columns integer, heat bytea, group_index integer, contribution double precision,
               model_id integer, method text)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.slice_heatmap(plpy, patient_id, scan_id, model_name)
$$;
