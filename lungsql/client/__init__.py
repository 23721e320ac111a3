"""What runs in a client of the database: the `lungsql` command (`cli`), the local cluster, connections
and migrations, the upload of DICOM files (`ingest`), CNNs stored into their table (`cnns`), the web
app's users, the site's secrets, the calls of the stored procedures (`calls`) and what differs between
PostgreSQL and SQL Server on the client side (`dialects`).
"""
