"""Analyses: facts about a model that passes ask for; computed once per graph version."""

from qpass.analyses.graph_facts import GraphFacts, GraphFactsResult

__all__ = ["GraphFacts", "GraphFactsResult"]
