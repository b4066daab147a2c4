"""Offline data stages (extract, cluster, balance, pack) and the demo data generator."""
