"""`fedrec audit`: the privacy officer's checks of a run's ledgers, claims and budgets."""
