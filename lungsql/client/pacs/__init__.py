"""Connections to a hospital's PACS: DICOMweb and DIMSE in, results back."""
