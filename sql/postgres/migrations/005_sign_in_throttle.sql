-- lungsql schema, version 5: sign-in throttling reads the audit log.
--
-- The web app counts recent failed sign-ins per address (and user name) in
-- lungsql.audit_log, so that every server process shares the counts.
CREATE INDEX audit_log_sign_ins ON lungsql.audit_log (address, occurred_at DESC)
    WHERE action IN ('login', 'login_failed');
