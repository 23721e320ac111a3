-- lungsql schema, version 6: the web app's boundary.
--
-- lungsql.sign_in counts recent failed sign-ins per user name (any case) from
-- every address, besides per address (the index of version 5): this index
-- finds a name's sign-in rows without reading the whole audit log.
CREATE INDEX audit_log_sign_ins_by_name ON lungsql.audit_log (lower(username), occurred_at DESC)
    WHERE action IN ('login', 'login_failed');
