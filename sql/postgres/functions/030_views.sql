-- Views for comparing what was trained.

-- Every model with its validation figures side by side, and the validation
-- patients it was measured on as a short fingerprint (`split`): models with the
-- same split were measured on the same patients, so their figures compare
-- directly (lungsql.train_model splits by a hash of each patient id, so models
-- trained on the same labelled patients share it, whatever their CNN).
--
--   SELECT cnn_name, name, version, auc, log_loss, brier FROM lungsql.model_comparison
--   WHERE split = (SELECT split FROM lungsql.model_comparison WHERE model_id = 3) ORDER BY auc DESC;
CREATE OR REPLACE VIEW lungsql.model_comparison AS
SELECT m.model_id,
       m.name,
       m.version,
       m.algorithm,
       CASE WHEN m.algorithm = 'ensemble' THEN NULL ELSE c.name END AS cnn_name,  -- an ensemble's members have theirs
       c.feature_dim,
       (m.metrics ->> 'valid_patients')::integer        AS valid_patients,
       (m.metrics ->> 'auc')::double precision          AS auc,
       (m.metrics ->> 'log_loss')::double precision     AS log_loss,
       (m.metrics ->> 'brier')::double precision        AS brier,
       (m.metrics ->> 'sensitivity')::double precision  AS sensitivity,
       (m.metrics ->> 'specificity')::double precision  AS specificity,
       left(md5((m.metrics -> 'validation_ids')::text), 12) AS split,
       m.trained_at,
       (SELECT array_agg(d.name ORDER BY d.name)
        FROM (SELECT DISTINCT ON (dd.name) dd.name, dd.model_id FROM lungsql.deployments dd
              ORDER BY dd.name, dd.deployment_id DESC) d
        WHERE d.model_id = m.model_id)                  AS deployed_as
FROM lungsql.models m
JOIN lungsql.cnn_models c ON c.cnn_id = m.cnn_id;
