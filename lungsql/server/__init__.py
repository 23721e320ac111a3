"""What runs inside the database server: the PL/Python entry points (`procedures`), the pipeline they
run (`pipeline`) over a data-access object (`plpy_data` inside PostgreSQL), the SQL Server scripts'
entry points (`mssql`), sign-in (`sign_in`) and the environment check. Nothing here connects to a
database or holds a credential: it reads and writes through the server it runs in.
"""
