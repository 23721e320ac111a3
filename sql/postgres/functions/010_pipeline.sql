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
CREATE OR REPLACE PROCEDURE lungsql.generate_features(
    cnn_name     text    DEFAULT NULL,   -- a name in lungsql.cnn_models; NULL: the newest CNN
    only_missing boolean DEFAULT true,   -- false: featurize every patient again
    shard        integer DEFAULT 0,      -- this session's part, 0 .. shards-1
    shards       integer DEFAULT 1,      -- number of sessions sharing the work
    retry_failed boolean DEFAULT false   -- true: also the patients in lungsql.feature_failures
)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
procedures.generate_features(plpy, cnn_name, only_missing, shard, shards, retry_failed)
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
