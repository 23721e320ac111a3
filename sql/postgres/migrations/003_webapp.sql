-- lungsql schema, version 3: the web app's users and its audit trail.

-- People who log in to the web app. Passwords are stored as salted hashes
-- (werkzeug's scrypt), never in clear.
CREATE TABLE lungsql.users (
    user_id        integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username       text NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    password_hash  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('clinician', 'admin')),
    disabled       boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Who viewed or scored which patient, when, from where. The web app's role
-- may add rows and read them, never change or delete them.
CREATE TABLE lungsql.audit_log (
    audit_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    username     text,
    action       text NOT NULL,
    patient_id   text,
    address      text,
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_recent ON lungsql.audit_log (occurred_at DESC);
CREATE INDEX audit_log_patient ON lungsql.audit_log (patient_id, occurred_at DESC);
