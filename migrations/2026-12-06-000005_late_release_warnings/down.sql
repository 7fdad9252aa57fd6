-- Nothing to undo: the due marks it set are recomputed by the jobs that read them.
SELECT 1;
