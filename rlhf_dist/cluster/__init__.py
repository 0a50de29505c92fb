"""The Ray cluster a run stands on: placement groups for the roles (``placement``), starting every
role's actors and joining them (``start``: ``Roles``), and engine restarts after a lost node
(``restarts``)."""
