-- The run that claimed a notice (`sending`): a key of the session advisory lock that run
-- holds on its recorder's connection while it lives (pg_advisory_lock(24946, claimed_by)).
-- A claim is taken over only when its run is gone (the lock is free), not when the claim's
-- lease has passed on the clock of whichever run looks: two one-off runs at --as-of values an
-- hour apart (or two instances whose clocks differ) took each other's fresh claims over and
-- sent most notices twice. Claims made before this migration (NULL) keep the lease rule.
ALTER TABLE notices ADD COLUMN claimed_by integer;
