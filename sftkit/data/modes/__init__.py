"""The ways of preparing a run's rows, one module each: every one reads the plan (``sftkit.data.plan``) and returns
one ``Prepared`` (``sftkit.data.prepared``) through its ``prepare(plan, recipe)``; ``sftkit.data.preparation``
picks one and runs the bad-row policy and the accounts on what it returns."""
