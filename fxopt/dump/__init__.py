"""Debug dumps: listings, Graphviz, diffs and an index page."""
from .listing import annotate, graph_listing
