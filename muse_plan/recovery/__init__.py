"""Self-repair: a training fault → a plan rewrite (a new revision, author
recovery, with the evidence as its reason) → roll back to the last good
checkpoint → resume. ``policies`` holds the escalation ladders."""
