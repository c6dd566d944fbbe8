"""Jobs on the API side: admission (`submit`), the one place state changes (`lifecycle`), and each job type's
admission checks (`merge`, `unlearn`). Used by the routes and by anything else that submits jobs."""
