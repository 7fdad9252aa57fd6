DROP INDEX accounts_not_good;
DROP INDEX resources_suspended;
DROP TRIGGER resources_keep_tombstones ON resources;
DROP FUNCTION arrears_refuse_resource_delete();
DROP TABLE control_plane_orders, release_warnings;
