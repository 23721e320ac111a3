-- The chest radiograph task (lungsql.tasks 'chest_xray14'): train one LightGBM booster
-- per finding, score an image's 14 findings. Featurize with
-- CALL lungsql.generate_features(task => 'chest_xray14'). Each body is a thin
-- shell around one function of lungsql.server.procedures.

-- Train one booster per finding on the labelled, featurized radiographs, each with
-- its own class weighting, split by patient (the official test list when it was
-- loaded). Returns each finding's validation AUC, positive and negative images,
-- and a last row 'mean'. Deployed as for CT: the first model of a name, then one
-- with a lower validation log loss (the mean over the findings).
--
--   SELECT * FROM lungsql.train_findings();
--   SELECT * FROM lungsql.train_findings('chest_xray14', '{"num_leaves": 7}', 'efficientnet-lite1');
CREATE OR REPLACE FUNCTION lungsql.train_findings(
    model_name text  DEFAULT 'chest_xray14',  -- the registry name
    params     jsonb DEFAULT '{}',            -- LightGBM parameters overriding lungsql's defaults
    cnn_name   text  DEFAULT NULL             -- whose features; NULL: the newest CNN
)
RETURNS TABLE (model_id integer, finding text, auc double precision, positives integer, negatives integer)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.train_findings(plpy, model_name, params, cnn_name)
$$;

-- The probability of each finding on one radiograph, most probable first, from
-- the deployed model (model_id: the one that answered); recorded in
-- lungsql.finding_predictions. A radiograph not featurized yet with the model's
-- CNN is featurized first.
--
--   SELECT finding, probability FROM lungsql.predict_findings(42);
CREATE OR REPLACE FUNCTION lungsql.predict_findings(
    image_id   bigint,               -- lungsql.radiographs.image_id
    model_name text DEFAULT NULL     -- NULL: the model deployed as 'chest_xray14'
)
RETURNS TABLE (finding text, probability double precision, model_id integer)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.predict_findings_of_one(plpy, image_id, model_name)
$$;

-- The same for many radiographs at once (one row per image and finding).
--
--   SELECT * FROM lungsql.predict_findings_batch(ARRAY(SELECT image_id FROM lungsql.radiographs));
CREATE OR REPLACE FUNCTION lungsql.predict_findings_batch(
    image_ids  bigint[],
    model_name text DEFAULT NULL
)
RETURNS TABLE (image_id bigint, finding text, probability double precision, model_id integer)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.predict_findings(plpy, image_ids, model_name)
$$;

-- One stored radiograph as displayed, through a window in display units (0
-- black .. 255 white; NULL: the whole range), at most max_side pixels on its
-- longer side: rows x columns bytes, row by row. Decoded inside the server under
-- the LUNGSQL_MAX_* limits; the file never leaves it. No row for an unknown image.
--
--   SELECT rows, columns, length(pixels) FROM lungsql.radiograph_image(1, 128, 200);
CREATE OR REPLACE FUNCTION lungsql.radiograph_image(
    image_id bigint,                 -- lungsql.radiographs.image_id
    level    real DEFAULT NULL,      -- the window's centre, 0 .. 255
    width    real DEFAULT NULL,      -- the window's width, above 0
    max_side integer DEFAULT 1024    -- the longer side at most, 16 .. 4096
)
RETURNS TABLE (rows integer, columns integer, pixels bytea)
LANGUAGE plpython3u STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.radiograph_image(plpy, image_id, level, width, max_side)
$$;

-- Where in the radiograph the features that raised a finding's probability
-- (default: the most probable finding) were strongest, for the deployed model:
-- the CNN's last feature map weighted by that finding's TreeSHAP contributions,
-- rows x columns bytes (0 .. 255) at the size radiograph_image shows by default.
-- An aid to reading the image, not a diagnosis.
--
--   SELECT finding, probability, method FROM lungsql.radiograph_heatmap(1);
CREATE OR REPLACE FUNCTION lungsql.radiograph_heatmap(
    image_id   bigint,
    finding    text DEFAULT NULL,    -- a finding of lungsql.findings; NULL: the most probable
    model_name text DEFAULT NULL     -- NULL: the model deployed as 'chest_xray14'
)
RETURNS TABLE (rows integer, columns integer, heat bytea, finding text, probability double precision,
               model_id integer, method text)
LANGUAGE plpython3u SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.radiograph_heatmap(plpy, image_id, finding, model_name)
$$;

-- The web app's boundary for radiographs (as 020_web.sql for CT): what a
-- clinician's page shows, no more.

-- A patient's radiographs, oldest follow-up first, with the hex SHA-256 of each
-- file (its image's ETag).
--
--   SELECT * FROM lungsql.web_patient_radiographs('1');
CREATE OR REPLACE FUNCTION lungsql.web_patient_radiographs(
    id text                  -- lungsql.patients.patient_id
)
RETURNS TABLE (image_id bigint, image_index text, modality text, view_position text, follow_up integer,
               rows integer, columns integer, sha256 text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
SELECT r.image_id, r.image_index, r.modality, r.view_position, r.follow_up, r.rows, r.columns,
       encode(r.sha256, 'hex')
FROM lungsql.radiographs r
WHERE r.patient_id = web_patient_radiographs.id
ORDER BY r.follow_up NULLS LAST, r.image_id
$$;

-- One radiograph as its page shows it: no row for an unknown image.
CREATE OR REPLACE FUNCTION lungsql.web_radiograph(
    id bigint                -- lungsql.radiographs.image_id
)
RETURNS TABLE (image_id bigint, patient_id text, image_index text, modality text, view_position text,
               follow_up integer, rows integer, columns integer, sha256 text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
SELECT r.image_id, r.patient_id, r.image_index, r.modality, r.view_position, r.follow_up, r.rows, r.columns,
       encode(r.sha256, 'hex')
FROM lungsql.radiographs r
WHERE r.image_id = web_radiograph.id
$$;
