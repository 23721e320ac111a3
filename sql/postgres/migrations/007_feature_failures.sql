-- lungsql schema, version 7: featurization goes on past a patient it cannot
-- featurize, and a run that was killed is told apart from one still running.

-- Patients a featurization run could not featurize with a CNN, and why (an
-- undecodable slice, a series whose slices cannot be stacked...). Later runs
-- leave them out until asked (retry_failed => true) or until their scans
-- change; a success deletes the row.
--
--   SELECT patient_id, reason, failed_at FROM lungsql.feature_failures;
CREATE TABLE lungsql.feature_failures (
    patient_id  text NOT NULL REFERENCES lungsql.patients ON DELETE CASCADE,
    cnn_id      integer NOT NULL REFERENCES lungsql.cnn_models ON DELETE CASCADE,
    run_id      bigint REFERENCES lungsql.feature_runs ON DELETE SET NULL,
    reason      text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, cnn_id)
);

-- status: 'running' while the backend that runs it lives, then 'finished',
-- or 'killed' when the next run finds its backend gone before it finished.
ALTER TABLE lungsql.feature_runs
    ADD COLUMN failed        integer NOT NULL DEFAULT 0,
    ADD COLUMN status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'finished', 'killed')),
    ADD COLUMN backend_pid   integer,
    ADD COLUMN backend_start timestamptz;
UPDATE lungsql.feature_runs SET status = 'finished' WHERE finished_at IS NOT NULL;

-- generate_features gained retry_failed: the old signature would be an
-- ambiguous overload of the new one.
DROP PROCEDURE IF EXISTS lungsql.generate_features(text, boolean, integer, integer);
