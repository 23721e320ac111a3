-- Python inside the server: how PL/Python finds lungsql, and what it sees.
--
-- Re-created by every `lungsql init`. Each PL/Python body is a thin shell that
-- calls one function of the lungsql package (lungsql/server/procedures.py).

-- Puts the Python environment recorded by `lungsql init` (settings row
-- 'python.path': the project folder and the venv's site-packages) in front of
-- this server process's sys.path. Called once per session by the other
-- functions; returns the paths it added.
CREATE OR REPLACE FUNCTION lungsql._load_python()
RETURNS text[]
LANGUAGE plpython3u
AS $$
import site
import sys
rows = plpy.execute("SELECT value::text AS value FROM lungsql.settings WHERE name = 'python.path'")
if not rows:
    plpy.error("lungsql has no Python environment recorded for this database",
               hint="run `lungsql init` with the lungsql that should run inside the server")
import json
paths = json.loads(rows[0]["value"])
before = list(sys.path)
for path in paths:
    site.addsitedir(path)
added = [p for p in sys.path if p not in before]
sys.path[:] = added + before
try:
    import lungsql
except ImportError as exc:
    plpy.error(f"Python inside the server cannot import lungsql from {paths}: {exc}",
               hint="the server's OS user must be able to read the project and its .venv; "
                    "run `lungsql init` again from the project's venv")
return added
$$;

-- What Python inside the server sees: one row per component with its version
-- and where it was loaded from. Raises an error naming the fix when a
-- component the stored procedures need is missing.
--
--   SELECT * FROM lungsql.check_environment();
CREATE OR REPLACE FUNCTION lungsql.check_environment()
RETURNS TABLE (component text, version text, location text)
LANGUAGE plpython3u
AS $$
import sys
if "lungsql.server.procedures" not in sys.modules:
    plpy.execute("SELECT lungsql._load_python()")
from lungsql.server import procedures
return procedures.check_environment(plpy)
$$;
