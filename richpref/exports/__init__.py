"""`richpref export`: a finished run's pairs in the layouts other trainers read."""
