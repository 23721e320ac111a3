"""The science: CT preprocessing, the CNN export and featurizer (ONNX Runtime), LightGBM training and
scoring, and the metrics. Pure Python over numpy: no database, no credentials. The in-server
procedures (lungsql.server), the SQL Server scripts, the CLI and the tests all call it.
"""
