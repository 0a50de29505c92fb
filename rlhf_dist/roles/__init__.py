"""The Ray actors, one module per role, and the groups the controller calls them through."""
