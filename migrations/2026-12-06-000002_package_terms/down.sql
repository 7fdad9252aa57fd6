DROP TABLE package_terms;
ALTER TABLE resources DROP COLUMN package_starts_at;
