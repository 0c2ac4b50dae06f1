"""Grounded car Q&A: visual evidence, knowledge-base retrieval, prompt, answering backends."""
