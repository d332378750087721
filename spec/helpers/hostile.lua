-- spec/helpers/hostile.lua: the runner of spec/hostile_spec.lua (issue 7). Rows are Lua snippets run in
-- child processes (luajit, same LUA_PATH), a batch of rows per child, each row under pcall in a fresh
-- environment with a full collection after it (so memory corruption crashes at its own row). When a child
-- dies or hangs, the rows it did not report are rerun one per child, which names the crashing row.
-- The same file is the child: `luajit spec/helpers/hostile.lua <rows file> <results file> <temp dir>`.
--
--   H.run(rows)          -> results[i] = {status = 'E'|'R'|'S'|'X', msg = text} for rows[i] ({code=, name=})
--                           E: raised msg; R: returned (msg = the returned value as text); S: the row does not
--                           compile; X: the child crashed or hung (msg says how)
--   H.verdict(row, res)  -> nil when the row holds, else the reason it fails
local H = {}

H.BATCH = 40
H.LUAJIT = os.getenv('LUAJIT') or 'luajit'
H.BATCH_TIMEOUT = 20  -- seconds for a child of a whole batch
H.ROW_TIMEOUT = 10    -- seconds for a child of one row
-- address-space cap of a child, so that a huge allocation fails at once instead of swapping (nil: no cap;
-- the spec drops it where a GPU is present, since a CUDA context reserves far more address space)
H.VMEM_KB = 4 * 1024 * 1024

local function escape(s) return (s:gsub('\\', '\\\\'):gsub('\n', '\\n'):gsub('\r', '\\r'):gsub('%z', '\\0')) end
local function unescape(s)
  return (s:gsub('\\(.)', function(c) return ({ n = '\n', r = '\r', ['0'] = '\0', ['\\'] = '\\' })[c] or c end))
end

-- how a returned value reads in a result
local function show(v)
  if type(v) == 'number' then
    if v ~= v then return 'nan' end
    if v == math.floor(v) and math.abs(v) < 2^53 then return string.format('%d', v) end
    return string.format('%.17g', v)
  end
  return tostring(v)
end

---------------------------------------------------------------------------- child side
-- the environment of one row: fresh tensors every row, a private temp directory T, file crafting helpers
local function make_env(fa, dir)
  local ffi = require 'ffi'
  local env = setmetatable({}, { __index = _G })
  env.fa, env.F, env.nn, env.optim, env.ffi = fa, fa.F, fa.nn, fa.optim, ffi
  env.nan, env.inf = 0 / 0, math.huge
  fa.manualSeed(1234)
  env.x = fa.randn(2, 3)                       -- float32 2x3
  env.xd = fa.randn(2, 3):double()             -- float64 2x3
  env.xi = fa.tensor({ 1, 2, 3 }, 'int64')     -- int64 3
  env.y = fa.randn(3)                          -- float32 3
  env.e = fa.zeros(1, 3):expand(2, 3)          -- expanded view (stride 0)
  env.cdata = ffi.new('int[1]')
  env.fn = function() end
  env.T = dir
  -- safetensors file T/name: 8-byte little-endian header length, header, data (default: `ndata` zero bytes)
  function env.st(header, ndata, name, data)
    local path = dir .. '/' .. (name or 'bad.safetensors')
    local n = #header
    local len = {}
    for i = 1, 8 do len[i] = string.char(n % 256); n = math.floor(n / 256) end
    local f = assert(io.open(path, 'wb'))
    f:write(table.concat(len), header, data or string.rep('\0', ndata or 0))
    f:close()
    return path
  end
  -- a file T/name with exactly these bytes
  function env.raw(bytes, name)
    local path = dir .. '/' .. (name or 'bad.safetensors')
    local f = assert(io.open(path, 'wb'))
    f:write(bytes)
    f:close()
    return path
  end
  function env.tgt(...) return fa.tensor({ ... }, 'int64') end
  -- valid fa.msda inputs: N=1, S=5 (levels 2x2, 1x1), M=1, D=2, Lq=2, P=1
  function env.msda_in(dtype)
    dtype = dtype or 'float32'
    local v = fa.randn(1, 5, 1, 2):to(dtype)
    local loc = fa.rand(1, 2, 1, 2, 1, 2):to(dtype)
    local a = fa.rand(1, 2, 1, 2, 1):to(dtype)
    return v, { { 2, 2 }, { 1, 1 } }, { 0, 4 }, loc, a
  end
  -- a small nn.MSDeformAttn and a valid input for it
  function env.mda()
    local m = fa.nn.MSDeformAttn { d_model = 4, n_levels = 2, n_heads = 1, n_points = 1 }
    local inp = { fa.randn(1, 2, 4), fa.rand(1, 2, 2, 2), fa.randn(1, 5, 4), { { 2, 2 }, { 1, 1 } } }
    return m, inp
  end
  return env
end

local function child(infile, outfile, base)
  local rows = dofile(infile)
  local out = assert(io.open(outfile, 'w'))
  local okfa, fa = pcall(require, 'fastattn')
  if not okfa then
    for _, r in ipairs(rows) do out:write(r.id, '\tS\t', escape('require fastattn failed: ' .. tostring(fa)), '\n') end
    out:close()
    return
  end
  local threads = fa.getNumThreads()
  for _, r in ipairs(rows) do
    local dir = base .. '/' .. r.id
    os.execute("mkdir -p '" .. dir .. "'")
    local status, msg
    local f, perr = loadstring(r.code, '=' .. r.name)
    if not f then
      status, msg = 'S', perr
    else
      local okenv, env = pcall(make_env, fa, dir)
      if not okenv then
        status, msg = 'S', 'row environment failed: ' .. tostring(env)
      else
        setfenv(f, env)
        local res = { pcall(f) }
        if res[1] then
          status, msg = 'R', show(res[2])
        else
          status = 'E'
          msg = type(res[2]) == 'string' and res[2] or ('<error object of type ' .. type(res[2]) .. '>')
        end
      end
    end
    collectgarbage('collect')
    collectgarbage('collect')
    -- undo what a row may have changed in the library's global state
    pcall(fa.setDefaultDtype, 'float32')
    pcall(fa.setNumThreads, threads)
    out:write(r.id, '\t', status, '\t', escape(msg), '\n')
    out:flush()
  end
  out:close()
end

---------------------------------------------------------------------------- parent side
local here = debug.getinfo(1, 'S').source:match('^@(.*)$')

local function shq(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function write_rows(path, list)
  local f = assert(io.open(path, 'w'))
  f:write('return {\n')
  for _, r in ipairs(list) do
    f:write(string.format('{id=%d, name=%q, code=%q},\n', r.id, r.name, r.code))
  end
  f:write('}\n')
  f:close()
end

-- runs the jobs {rows = {...}, timeout = s} in parallel children; returns, per job, {results = {id = {status,
-- msg}}, rc = exit status, err = stderr tail}
-- a search path with its relative entries made absolute (children run in their temp dir, so that a row
-- writing to a relative path writes there, not into the checkout)
local function absolute(path, cwd)
  local out = {}
  for entry in (path .. ';'):gmatch('([^;]*);') do
    if entry ~= '' and entry:sub(1, 1) ~= '/' then entry = cwd .. '/' .. entry:gsub('^%./', '') end
    out[#out + 1] = entry
  end
  return table.concat(out, ';')
end

local function run_jobs(jobs, dir)
  local cmd = {}
  local h = io.popen('pwd')
  local cwd = h:read('*l')
  h:close()
  local env = 'LUA_PATH=' .. shq(absolute(package.path, cwd)) .. ' LUA_CPATH=' .. shq(absolute(package.cpath, cwd))
              .. ' OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1'
  local script = here:sub(1, 1) == '/' and here or (cwd .. '/' .. here:gsub('^%./', ''))
  for j, job in ipairs(jobs) do
    local p = dir .. '/job' .. j
    write_rows(p .. '.rows', job.rows)
    cmd[#cmd + 1] = string.format('(mkdir -p %s && cd %s && %s %s timeout -s KILL %d %s %s %s %s %s >/dev/null 2>%s; echo $? >%s) &',
      shq(p .. '.tmp'), shq(p .. '.tmp'), H.VMEM_KB and ('ulimit -v ' .. H.VMEM_KB .. ';') or '', env, job.timeout,
      H.LUAJIT, shq(script), shq(p .. '.rows'), shq(p .. '.out'), shq(p .. '.tmp'), shq(p .. '.err'), shq(p .. '.rc'))
  end
  cmd[#cmd + 1] = 'wait'
  os.execute(table.concat(cmd, '\n'))
  local out = {}
  for j = 1, #jobs do
    local p = dir .. '/job' .. j
    local res = {}
    local f = io.open(p .. '.out')
    if f then
      for line in f:lines() do
        local id, st, msg = line:match('^(%d+)\t(%u)\t(.*)$')
        if id then res[tonumber(id)] = { status = st, msg = unescape(msg) } end
      end
      f:close()
    end
    local rc = -1
    f = io.open(p .. '.rc')
    if f then rc = tonumber(f:read('*l')) or -1; f:close() end
    local err = ''
    f = io.open(p .. '.err')
    if f then err = f:read('*a'):sub(-400); f:close() end
    out[j] = { results = res, rc = rc, err = err }
  end
  return out
end

local function describe_death(rc, err)
  local how
  if rc == 137 then how = 'killed (hang past the time limit, or SIGKILL)'
  elseif rc > 128 then how = 'killed by signal ' .. (rc - 128) .. (rc == 139 and ' (segfault)' or rc == 134 and ' (abort)' or rc == 136 and ' (SIGFPE)' or '')
  else how = 'exited with status ' .. tostring(rc) end
  err = err:gsub('%s+$', '')
  return 'child process ' .. how .. (err ~= '' and (': ' .. err) or '')
end

function H.run(rows)
  local dir = os.tmpname()
  os.remove(dir)
  os.execute('mkdir -p ' .. shq(dir))
  local byid, results = {}, {}
  for i, r in ipairs(rows) do byid[i] = r; r.id = i end
  local jobs = {}
  for i = 1, #rows, H.BATCH do
    local b = {}
    for k = i, math.min(i + H.BATCH - 1, #rows) do b[#b + 1] = rows[k] end
    jobs[#jobs + 1] = { rows = b, timeout = H.BATCH_TIMEOUT }
  end
  local singles = {}
  for j, o in ipairs(run_jobs(jobs, dir)) do
    local died = false
    for _, r in ipairs(jobs[j].rows) do
      local res = o.results[r.id]
      if res and not died then results[r.id] = res
      else
        died = true
        singles[#singles + 1] = { rows = { r }, timeout = H.ROW_TIMEOUT }
      end
    end
  end
  -- the rows a dead batch left: one child each, a few at a time
  local PAR = 8
  for i = 1, #singles, PAR do
    local group = {}
    for k = i, math.min(i + PAR - 1, #singles) do group[#group + 1] = singles[k] end
    for j, o in ipairs(run_jobs(group, dir)) do
      local r = group[j].rows[1]
      local res = o.results[r.id]
      if res and o.rc == 0 then results[r.id] = res
      else results[r.id] = { status = 'X', msg = describe_death(o.rc, o.err) } end
    end
  end
  os.execute('rm -rf ' .. shq(dir))
  return results
end

---------------------------------------------------------------------------- verdicts
-- raw Lua/FFI text, library positions and C function names that must never reach the user
H.FORBIDDEN = {
  { 'attempt to', 'raw Lua error text' },
  { 'cannot convert', 'raw FFI conversion text' },
  { 'bad argument', 'raw Lua argument text' },
  { 'table expected', 'raw Lua argument text' },
  { 'stack traceback', 'a traceback inside the message' },
  { 'lua/fastattn/', 'a library path' },
  { '%.lua:%d+:', 'a Lua source position other than the caller\'s' },
  { '%f[%w_]fa_[%w_]+:', 'a C function name' },
  { 'nbytes', 'an internal C argument name' },
}

local function match_spec(body, spec)
  if type(spec) == 'table' then -- alternatives: any one
    for _, s in ipairs(spec) do if match_spec(body, s) then return true end end
    return false
  end
  if spec:sub(1, 1) == '!' then return not body:find(spec:sub(2)) end
  return body:find(spec) ~= nil
end

local function spec_text(spec)
  if type(spec) == 'table' then
    local t = {}
    for i, s in ipairs(spec) do t[i] = spec_text(s) end
    if #t > 4 then return '(' .. t[1] .. ' | ... ' .. (#t - 1) .. ' variants)' end
    return '(' .. table.concat(t, ' | ') .. ')'
  end
  return spec
end

local function plain(s) return (s:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')) end

-- the checks of an error message; nil when it is in the house format and matches the row
function H.check_error(row, msg)
  local prefix = '^' .. plain(row.name) .. ':%d+: '
  local body
  if msg:find(prefix) then body = msg:gsub(prefix, '', 1)
  else return 'not raised at the caller\'s line (no "' .. row.name .. ':N:" prefix): ' .. msg end
  for _, f in ipairs(H.FORBIDDEN) do
    if body:find(f[1]) then return 'message contains ' .. f[2] .. ': ' .. msg end
  end
  local fns = type(row.fn) == 'table' and row.fn or { row.fn }
  local okfn = false
  for _, fn in ipairs(fns) do
    if body:sub(1, #fn + 2) == fn .. ': ' then okfn = true end
  end
  if not okfn then return 'message does not start with ' .. table.concat(fns, ' or ') .. ': ' .. msg end
  for _, spec in ipairs(row.pats or {}) do
    if not match_spec(body, spec) then return 'message does not match ' .. spec_text(spec) .. ': ' .. msg end
  end
  return nil
end

function H.verdict(row, res)
  if res == nil then return 'no result (runner failure)' end
  if res.status == 'X' then return 'crash: ' .. res.msg end
  if res.status == 'S' then return 'the row itself is broken: ' .. res.msg end
  if row.kind == 'ok' then
    if res.status == 'E' then return 'raised instead of returning ' .. row.want .. ': ' .. res.msg end
    if res.msg ~= row.want then return 'returned ' .. res.msg .. ', expected ' .. row.want end
    return nil
  end
  if row.kind == 'either' then
    if res.status == 'R' then
      if res.msg == row.want then return nil end
      return 'returned ' .. res.msg .. ' (expected ' .. row.want .. ' or an error)'
    end
    return H.check_error(row, res.msg)
  end
  if row.kind == 'ret' then
    if res.status ~= 'R' then return 'raised instead of returning a message: ' .. res.msg end
    for _, f in ipairs(H.FORBIDDEN) do
      if res.msg:find(f[1]) then return 'message contains ' .. f[2] .. ': ' .. res.msg end
    end
    for _, spec in ipairs(row.pats or {}) do
      if not match_spec(res.msg, spec) then return 'message does not match ' .. spec_text(spec) .. ': ' .. res.msg end
    end
    return nil
  end
  if res.status == 'R' then return 'no error raised (silently accepted; returned ' .. res.msg .. ')' end
  return H.check_error(row, res.msg)
end

-- child mode
if select('#', ...) == 3 and arg and arg[0] and arg[0]:match('hostile%.lua$') then
  child(...)
  os.exit(0)
end

return H
