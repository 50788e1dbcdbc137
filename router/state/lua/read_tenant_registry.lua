-- read_tenant_registry.lua: the tenants the admin API created and the keys it issued, at one version.
--
-- KEYS[1]   tenants version (string)                    Keys.tenants_version
-- KEYS[2]   tenants (hash name -> JSON spec)            Keys.tenants
-- KEYS[3]   issued keys (hash sha256 hex -> JSON record) Keys.tenant_keys
-- Returns {version, {name, spec, ...}, {digest, record, ...}}.

return {tonumber(redis.call('GET', KEYS[1])) or 0, redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3])}
