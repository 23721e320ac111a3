"""Past one machine: featurization on an Apache Spark cluster, over the same tables.

Each Spark task is one shard of `lungsql.generate_features`: it opens its own database
connection (credentials from the executor's environment, never from the driver's command line),
and runs the very pipeline the stored procedure runs, `lungsql.server.pipeline.generate_features`,
over the same data access (`lungsql.server.plpy_data`, here through `plpy_client` on that
connection). Patients go to tasks by the hash of their id that shard sessions use, each patient's
features are committed on their own, and every task leaves a run record, so a killed job's rerun
finishes the rest without duplicates.
"""
