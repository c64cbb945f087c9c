"""Explanation methods and the shared machinery that turns their maps into API outputs."""
