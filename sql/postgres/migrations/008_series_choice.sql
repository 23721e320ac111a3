-- lungsql schema, version 8: the series a patient is featurized from is chosen
-- on purpose, recorded with the features and open to a DBA's override, and an
-- Enhanced CT file (all frames of a series in one multi-frame file) is stored
-- with each frame's position.

-- What the choice of series reads from each stored file: whether it is a
-- localizer (scout), how far its slices tilt from axial, its reconstruction
-- kernel and description, and for a multi-frame file each frame's z.
ALTER TABLE lungsql.scans
    ADD COLUMN image_type         text,              -- ImageType (or the frames' FrameType), values joined by '\'
    ADD COLUMN series_description text,
    ADD COLUMN convolution_kernel text,
    ADD COLUMN tilt_degrees       double precision,  -- angle of the slice normal from the patient's z axis
    ADD COLUMN frames             integer NOT NULL DEFAULT 1 CHECK (frames > 0),
    ADD COLUMN frame_z            double precision[] -- each frame's z in frame order (frames > 1 only)
        CHECK (frame_z IS NULL OR cardinality(frame_z) = frames);

-- One row per stored series, what the choice of series compares:
--
--   SELECT * FROM lungsql.series WHERE patient_id = 'p0001';
CREATE VIEW lungsql.series AS
SELECT s.patient_id,
       s.study_instance_uid,
       s.series_instance_uid,
       min(s.modality)                                       AS modality,
       count(*)::integer                                     AS files,
       sum(s.frames)::integer                                AS slices,
       max(coalesce(z.high, s.z_position)) - min(coalesce(z.low, s.z_position)) AS coverage_mm,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY s.slice_thickness) AS slice_thickness,
       max(s.tilt_degrees)                                   AS tilt_degrees,
       bool_or(s.image_type ~* '(^|\\)LOCALIZER(\\|$)')      AS localizer,
       min(s.series_description)                             AS series_description,
       min(s.convolution_kernel)                             AS convolution_kernel,
       min(s.rows)                                           AS rows,
       min(s.columns)                                        AS columns
FROM lungsql.scans AS s
LEFT JOIN LATERAL (SELECT min(v) AS low, max(v) AS high FROM unnest(s.frame_z) AS v) AS z ON true
GROUP BY s.patient_id, s.study_instance_uid, s.series_instance_uid;

-- A DBA's choice of series for a patient, which overrides the rule
-- (lungsql.choose_series sets and clears it).
CREATE TABLE lungsql.series_choices (
    patient_id          text PRIMARY KEY REFERENCES lungsql.patients ON DELETE CASCADE,
    series_instance_uid text NOT NULL,
    chosen_by           text NOT NULL DEFAULT current_user,
    chosen_at           timestamptz NOT NULL DEFAULT now()
);

-- The series the features were computed from, and why it was chosen (NULL
-- for features computed before version 8).
ALTER TABLE lungsql.features
    ADD COLUMN series_instance_uid text,
    ADD COLUMN series_reason       text;
