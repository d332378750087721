-- bench/lib.lua: what the benchmarks share (bench/gpu.lua, bench/msda.lua, bench/cpu.lua; the next op's bench
-- too): the command line, the timers, the Python peers and the output.
--
--   local B = require 'bench.lib'   (the benches name it `bench`)
--   o = B.args(cli, arg)            fa.util's typed options: --help, bad options refused before anything runs
--   B.needGPU(prog, hint)           exit 1 with a clear message when there is no CUDA GPU
--   B.median(t)                     the lower median of a list of numbers
--   s = B.cpuTime(fn, {runs =, warmup = 2, budget = nil})
--                                   median wall-clock seconds of fn over `runs` calls after `warmup` calls;
--                                   stops after `budget` seconds (at least 3 runs)
--   ms = B.cpuBest(fn, rounds, runs) the smallest of `rounds` cpuTime medians (warmup 1), in milliseconds
--   time, free = B.gpuTimer{reps =, warmup = 3, syncEach = false}
--   ms = time(fn, nsets)            median milliseconds of fn(k) on the GPU, k rotating over 1..nsets (inputs
--                                   that do not all fit in the L2): warm-up calls, then `reps` calls each
--                                   between two CUDA events and each after a 256 MiB write that evicts the L2
--                                   (every timed call starts cold) and keeps the GPU busy while the host queues
--                                   the call (the events measure the kernels, not the launch path). syncEach
--                                   reads each call's events before queueing the next (bench/msda.lua's
--                                   method); otherwise all are read at the end. free() releases the buffer.
--   bw = B.copyBandwidth()          device-to-device copy of 1 GiB: bytes read + written per second
--   bytes = B.extraMemory(fn)       the peak CUDA allocation during fn() above what was allocated before it
--                                   (garbage collected first); what fn keeps in its locals counts
--   lines, err = B.runPeer(script, args, {python =, echo = true})
--                                   runs bench/peers/<script> with a python that imports torch; its output
--                                   lines; err (nil when it ran) says "unavailable (...)" or how it failed
--   recs, info = B.peerRecords(script, args, {python =, skip = false})
--                                   B.runPeer of a script that prints one JSON object a line ({"impl": ...}, flat):
--                                   the records as tables (numbers as numbers), and its info line or why not
--                                   (skip: 'skipped (--peer 0)', nothing run)
--   B.peerMs(p, phase)              record p's <phase>_ms as "1.234", its error_<phase>, or '-' without p
--   B.pct(floor, t)                 "37%": a time as a fraction of its hardware floor (floor / t)
--   B.fmt(x, digits), B.ratio(a, b, digits, suffix)   numbers or '-' when missing
--   T = B.table(columns)            columns: {{'op'}, {'ours ms', right = true}, ...}; T:add(cells)
--   T:markdown() / T:tsv()          the lines of a markdown table / tab-separated text with a header line
--   R = B.report()                  R:line(s) prints and keeps; R:save(path) writes the kept lines
--   rows = B.cases{configs =, dtypes =, parse =, run =, note =, device =}
--                                   per config and dtype r = run(parse(config), dtype) (r.err: why it failed),
--                                   r.config and r.dtype set, a line on stderr (note(r): what it measured), then
--                                   the garbage collected (and on 'cuda' the cache emptied); the list of r
local fa = require 'fastattn'

local B = {}
B.dir = (debug.getinfo(1, 'S').source:match('^@(.*)/[^/]*$')) or 'bench'
B.now = fa.clock -- monotonic wall-clock seconds

function B.args(cli, args) return fa.util.cli(cli, args) end

function B.needGPU(prog, hint)
  if fa.cuda.isAvailable() then return end
  io.stderr:write(string.format('%s: needs a CUDA GPU, and none was found (%s); run it on the GPU machine%s '
                                .. '(--help lists the options)\n', prog,
                                fa.C.fa_has_cuda() ~= 0 and 'this build has the CUDA kernels, but no device answers'
                                or 'this build has no CUDA kernels: FA_CUDA=0', hint and (', ' .. hint) or ''))
  os.exit(1)
end

function B.median(t)
  local s = { unpack(t) }
  table.sort(s)
  return s[math.floor((#s + 1) / 2)]
end

---------------------------------------------------------------------------- timers
function B.cpuTime(fn, o)
  for _ = 1, o.warmup or 2 do fn() end
  local t, start = {}, B.now()
  for i = 1, o.runs do
    local t0 = B.now()
    fn()
    t[i] = B.now() - t0
    if o.budget and B.now() - start > o.budget and i >= 3 then break end
  end
  return B.median(t)
end

function B.cpuBest(fn, rounds, runs)
  local best = math.huge
  for _ = 1, rounds do best = math.min(best, B.cpuTime(fn, { runs = runs, warmup = 1 }) * 1e3) end
  return best
end

function B.gpuTimer(o)
  local reps, warmup = o.reps, o.warmup or 3
  local flush = fa.empty({ 64 * 1024 * 1024 }, { dtype = 'float32', device = 'cuda' }) -- 256 MiB
  local e0, e1 = {}, {}
  for r = 1, reps do e0[r], e1[r] = fa.cuda.Event(), fa.cuda.Event() end
  local function time(fn, nsets)
    nsets = nsets or 1
    for i = 1, warmup do fn((i - 1) % nsets + 1) end
    local t = {}
    for r = 1, reps do
      flush:fill(r)
      e0[r]:record()
      fn((r - 1) % nsets + 1)
      e1[r]:record()
      if o.syncEach then t[r] = e0[r]:elapsedTime(e1[r]) end
    end
    if not o.syncEach then
      for r = 1, reps do t[r] = e0[r]:elapsedTime(e1[r]) end
    end
    return B.median(t)
  end
  local function free()
    flush = nil
    collectgarbage()
    fa.cuda.emptyCache()
  end
  return time, free
end

function B.copyBandwidth()
  local src = fa.empty(256 * 1024 * 1024, { device = 'cuda' }):fill(1)
  local dst = fa.empty_like(src)
  local ms = fa.cuda.time(function() dst:copy(src) end, 10, 2)
  local bw = 2 * src:numel() * 4 / (ms * 1e-3)
  src, dst = nil, nil
  collectgarbage()
  fa.cuda.emptyCache()
  return bw
end

function B.extraMemory(fn)
  collectgarbage()
  fa.cuda.synchronize()
  local base = fa.cuda.memoryAllocated()
  fa.cuda.resetPeakStats()
  fn()
  fa.cuda.synchronize()
  return fa.cuda.memoryStats().peak - base
end

---------------------------------------------------------------------------- the Python peers
local function file_exists(path)
  local f = io.open(path, 'r')
  if f then f:close() end
  return f ~= nil
end

local function runs(cmd) -- exit code 0 (LuaJIT returns the status; Lua 5.2+ returns true)
  local r = os.execute(cmd)
  return r == 0 or r == true
end

-- a python that imports torch: the given one, $PYTHON, python3, /usr/bin/python3
function B.findPython(explicit)
  local list = explicit and { explicit } or { os.getenv('PYTHON') or '', 'python3', '/usr/bin/python3' }
  for _, p in ipairs(list) do
    if p ~= '' and runs(p .. ' -c "import torch" >/dev/null 2>&1') then return p end
  end
end

function B.runPeer(script, args, o)
  o = o or {}
  local path = B.dir .. '/peers/' .. script
  if not file_exists(path) then return {}, 'unavailable (bench/peers/' .. script .. ' is missing)' end
  local py = B.findPython(o.python)
  if not py then
    return {}, 'unavailable (no python that imports torch' .. (o.python and (': ' .. o.python) or '; see --python or $PYTHON') .. ')'
  end
  local cmd = string.format('%s %s %s 2>&1; echo "__exit=$?"', py, path, args or '')
  if o.echo ~= false then io.stderr:write('peer: ' .. cmd .. '\n') end
  local f = io.popen(cmd)
  local lines, code = {}, nil
  for line in f:lines() do
    local c = line:match('^__exit=(%d+)$')
    if c then code = tonumber(c)
    else
      lines[#lines + 1] = line
      if o.echo ~= false then io.stderr:write('  ' .. line .. '\n') end
    end
  end
  f:close()
  if code ~= 0 then
    return lines, string.format('failed (bench/peers/%s exited with %s: %s)', script, tostring(code), lines[#lines] or '')
  end
  return lines, nil
end

function B.peerRecords(script, args, o)
  if o.skip then return {}, 'skipped (--peer 0)' end
  local lines, err = B.runPeer(script, args, { python = o.python })
  local recs, info = {}, err
  for _, line in ipairs(lines) do
    local impl = line:match('^{"impl": "([^"]+)"')
    if impl == 'info' then info = info or line
    elseif impl then
      local r = { impl = impl }
      for k, v in line:gmatch('"([%w_]+)": (%-?[%d%.eE%+%-]+)') do r[k] = tonumber(v) end
      for k, v in line:gmatch('"([%w_]+)": "([^"]*)"') do r[k] = v end
      recs[#recs + 1] = r
    end
  end
  return recs, info
end

function B.peerMs(p, phase)
  if p and p[phase .. '_ms'] then return B.fmt(p[phase .. '_ms'], 3) end
  return p and p['error_' .. phase] or '-'
end

---------------------------------------------------------------------------- output
function B.fmt(x, digits) return x and string.format('%.' .. (digits or 3) .. 'f', x) or '-' end
function B.ratio(a, b, digits, suffix)
  if not (a and b) then return '-' end
  return string.format('%.' .. (digits or 2) .. 'f', a / b) .. (suffix or '')
end
function B.pct(floor, t) return string.format('%d%%', math.floor(100 * floor / t + 0.5)) end

local Table = {}
Table.__index = Table
function B.table(columns) return setmetatable({ columns = columns, rows = {} }, Table) end
function Table:add(cells) self.rows[#self.rows + 1] = cells end
function Table:markdown()
  local head, rule = {}, {}
  for i, c in ipairs(self.columns) do head[i], rule[i] = c[1], c.right and '---:' or '---' end
  local out = { '| ' .. table.concat(head, ' | ') .. ' |', '|' .. table.concat(rule, '|') .. '|' }
  for _, r in ipairs(self.rows) do
    local cells = {}
    for i = 1, #self.columns do cells[i] = tostring(r[i] == nil and '' or r[i]) end
    out[#out + 1] = '| ' .. table.concat(cells, ' | ') .. ' |'
  end
  return out
end
function Table:tsv()
  local head = {}
  for i, c in ipairs(self.columns) do head[i] = c[1] end
  local out = { table.concat(head, '\t') }
  for _, r in ipairs(self.rows) do
    local cells = {}
    for i = 1, #self.columns do cells[i] = tostring(r[i] == nil and '' or r[i]):gsub('[\t\n]', ' ') end
    out[#out + 1] = table.concat(cells, '\t')
  end
  return table.concat(out, '\n') .. '\n'
end

local Report = {}
Report.__index = Report
function B.report() return setmetatable({ lines = {} }, Report) end
function Report:line(s)
  print(s)
  self.lines[#self.lines + 1] = s
end
function Report:lines_of(t) for _, s in ipairs(t) do self:line(s) end end

function B.cases(o)
  local rows = {}
  for _, cs in ipairs(o.configs) do
    local c = o.parse(cs)
    for _, dtype in ipairs(o.dtypes) do
      local r = o.run(c, dtype)
      r.config, r.dtype = cs, dtype
      rows[#rows + 1] = r
      io.stderr:write(r.err and string.format('%s %s: error: %s\n', cs, dtype, r.err)
                      or string.format('%s %s: %s\n', cs, dtype, o.note(r)))
      collectgarbage()
      if o.device == 'cuda' then fa.cuda.emptyCache() end
    end
  end
  return rows
end

-- writes text to path (the benches' --out and --tsv); a failure is reported, the run's output is already printed
function B.write(path, text)
  local f, err = io.open(path, 'w')
  if f then
    local ok, werr = f:write(text)
    local cok, cerr = f:close()
    err = (not ok and werr) or (not cok and cerr) or nil
  end
  if err then
    io.stderr:write('cannot write ' .. path .. ': ' .. tostring(err) .. '\n')
    return false
  end
  return true
end
function Report:save(path) return B.write(path, table.concat(self.lines, '\n') .. '\n') end

return B
