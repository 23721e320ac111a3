-- Where the cores went in a featurization run: CPU seconds per step (reading,
-- decoding, preprocessing, cnn, writing), summed over the threads that ran it.
-- The steps overlap in time, so their wall-clock times would not say it.
ALTER TABLE lungsql.feature_runs ADD COLUMN cpu_seconds jsonb;
