-- fa.util: what the example scripts (examples/) and the benchmarks (bench/) share: typed command-line
-- options with --help, the device set-up before a run, and an SVG chart of a loss curve.
--
-- A script describes its command line once, as a table (cli):
--   { prog = 'train_msda.lua', usage = 'bin/fastattn examples/train_msda.lua [options]',
--     about = 'what it does (help text)', footer = 'e.g. which make target runs it',
--     options = { { 'steps', 'int', 600, min = 1, help = 'training steps' }, ... },
--     check = function(o) return nil or 'option --x: ...' end }   -- checks across options, after parsing
-- An option is { name, type, default, help = ..., (type's fields) }:
--   'int'     an integer; min, max                      'number'  a finite number; min, max, positive = true
--   'choice'  one of choices = {...}                    'string'  any text
--   'list'    comma-separated words; choices (optional)  'ints'    comma-separated integers; min
--   'flag'    true when given; takes no value           'path'    a file to write: checked writable while
--   'file'    a file to read: checked readable                    parsing; none = true lets '' / 'none' give false
-- meta = 'N' names the value in the help; default_text replaces the default there (e.g. 'all cores').
-- On the command line `--name value` or `--name=value`; '-' and '_' in names are the same; --help or -h.
--
--   o, err = U.parseArgs(cli, args)  options (names with '_' for '-'; o.help when --help was given)
--                                    or nil and "prog: option --x: expected ..., got ...".
--   o = U.cli(cli, args)             for scripts: --help prints U.help(cli) and exits 0; a bad option (or
--                                    --device cuda without a GPU) prints the message and the usage line on
--                                    stderr and exits 1, before anything runs.
--   U.help(cli), U.usage(cli), U.defaults(cli)
--   ok, err = U.setupDevice(o)       o.threads sets the thread count; o.device 'cuda' needs a CUDA device
--   U.writePlot(path, values, opts)  SVG line chart of values (losses) per step; opts: title, xlabel,
--                                    ylabel, log (default true: log scale), average (default true)
local fa = require 'fastattn'
local E = require 'fastattn.errors'

local U = {}

local function norm(name) return (name:gsub('%-', '_')) end
local function quote(s) return string.format('%q', s) end

local function opt_fields(o)
  return o.name or o[1], o.type or o[2], (o.default ~= nil) and o.default or o[3]
end

local function join_or(t)
  if #t == 1 then return t[1] end
  return table.concat(t, ', ', 1, #t - 1) .. ' or ' .. t[#t]
end

-- what the value of an option must be, in words
local function expected(o)
  local _, ty = opt_fields(o)
  if ty == 'int' or ty == 'ints' then
    local kind = 'integer'
    if o.min == 1 and not o.max then kind = 'positive integer'
    elseif o.min == 0 and not o.max then kind = 'non-negative integer' end
    local range = ''
    if kind == 'integer' then
      if o.min and o.max then range = string.format(' in %d..%d', o.min, o.max)
      elseif o.min then range = string.format(' >= %d', o.min)
      elseif o.max then range = string.format(' <= %d', o.max) end
    end
    if ty == 'ints' then return 'a comma-separated list of ' .. kind .. 's' .. range end
    return (kind == 'integer' and 'an ' or 'a ') .. kind .. range
  elseif ty == 'number' then
    if o.positive then return 'a positive number' end
    if o.min == 0 and not o.max then return 'a non-negative number' end
    if o.min and o.max then return string.format('a number in [%g, %g]', o.min, o.max) end
    if o.min then return string.format('a number >= %g', o.min) end
    if o.max then return string.format('a number <= %g', o.max) end
    return 'a number'
  elseif ty == 'choice' then
    return join_or(o.choices)
  elseif ty == 'list' then
    return o.choices and ('a comma-separated list of ' .. table.concat(o.choices, ', ')) or 'a comma-separated list'
  elseif ty == 'path' or ty == 'file' then
    return o.none and "a file path (or 'none')" or 'a file path'
  end
  return 'a value'
end

local function integer_ok(o, n)
  return n and n == n and n > -2^53 and n < 2^53 and n == math.floor(n) and (not o.min or n >= o.min)
         and (not o.max or n <= o.max)
end

-- io.open's message "path: reason" -> "reason"
local function reason(path, err)
  err = tostring(err)
  if err:sub(1, #path + 2) == path .. ': ' then err = err:sub(#path + 3) end
  return err
end

-- can `path` be written? Leaves an existing file as it was and removes a file it had to create.
local function writable(path)
  local f = io.open(path, 'r')
  if f then
    f:close()
    local a, err = io.open(path, 'a')
    if not a then return nil, err end
    a:close()
    return true
  end
  local w, err = io.open(path, 'w')
  if not w then return nil, err end
  w:close()
  os.remove(path)
  return true
end

-- the value of option o from the string v, or nil and the message (after "option --name: ")
local function convert(o, v)
  local _, ty = opt_fields(o)
  local bad = function() return nil, 'expected ' .. expected(o) .. ', got ' .. quote(v) end
  if ty == 'int' then
    local n = tonumber(v)
    if not integer_ok(o, n) then return bad() end
    return n
  elseif ty == 'number' then
    local n = tonumber(v)
    if not n or n ~= n or n == math.huge or n == -math.huge or (o.positive and n <= 0) or (o.min and n < o.min)
       or (o.max and n > o.max) then
      return bad()
    end
    return n
  elseif ty == 'choice' then
    for _, c in ipairs(o.choices) do if c == v then return v end end
    return bad()
  elseif ty == 'string' then
    return v
  elseif ty == 'list' or ty == 'ints' then
    local t = {}
    if v:match('^,') or v:match(',$') or v:match(',,') or v == '' then return bad() end
    for w in v:gmatch('[^,]+') do
      if ty == 'ints' then
        local n = tonumber(w)
        if not integer_ok(o, n) then return bad() end
        t[#t + 1] = n
      else
        if o.choices then
          local ok = false
          for _, c in ipairs(o.choices) do if c == w then ok = true end end
          if not ok then
            return nil, string.format('expected %s, got %s (%s is not one of them)', expected(o), quote(v), quote(w))
          end
        end
        t[#t + 1] = w
      end
    end
    return t
  elseif ty == 'path' then
    if o.none and (v == '' or v == 'none') then return false end
    if v == '' then return bad() end
    local ok, err = writable(v)
    if not ok then return nil, 'cannot write ' .. quote(v) .. ': ' .. reason(v, err) end
    return v
  elseif ty == 'file' then
    local f, err = io.open(v, 'r')
    if f then
      local data, rerr = f:read(1) -- a directory opens, but cannot be read
      f:close()
      if data or not rerr then return v end
      err = rerr
    end
    return nil, 'cannot read ' .. quote(v) .. ': ' .. reason(v, err)
  end
  return v
end

local function check_cli(fn, cli)
  E.opts(fn, 'cli', cli, { prog = true, usage = true, about = true, footer = true, options = true, check = true })
  E.string(fn, 'cli.prog', cli.prog)
  if type(cli.options) ~= 'table' then E.argv(fn, 'cli.options', 'a list of options', cli.options) end
  local types = { 'int', 'number', 'choice', 'string', 'list', 'ints', 'flag', 'path', 'file' }
  for i, o in ipairs(cli.options) do
    local name, ty = opt_fields(o)
    E.string(fn, 'cli.options[' .. i .. '] name', name)
    E.string(fn, 'cli.options[' .. i .. '] type', ty, types)
    if ty == 'choice' and type(o.choices) ~= 'table' then
      E.argv(fn, 'cli.options[' .. i .. '].choices', 'a list of strings', o.choices)
    end
  end
end

-- the options with their defaults (tables copied)
function U.defaults(cli)
  local o = {}
  for _, spec in ipairs(cli.options) do
    local name, ty, d = opt_fields(spec)
    if type(d) == 'table' then d = { unpack(d) } end
    if ty == 'flag' and d == nil then d = false end
    o[norm(name)] = d
  end
  return o
end

function U.usage(cli)
  return 'usage: ' .. (cli.usage or cli.prog .. ' [options]') .. '  (--help lists the options)'
end

local function show_default(d)
  if type(d) == 'table' then return table.concat(d, ',') end
  return tostring(d)
end

function U.help(cli)
  local out = {}
  if cli.about then out[#out + 1] = cli.prog .. ': ' .. cli.about end
  out[#out + 1] = 'usage: ' .. (cli.usage or cli.prog .. ' [options]')
  out[#out + 1] = ''
  out[#out + 1] = 'options:'
  local left = {}
  local width = 0
  for i, o in ipairs(cli.options) do
    local name, ty = opt_fields(o)
    local meta = o.meta or ({ int = 'N', number = 'X', ints = 'N,N', path = 'FILE', file = 'FILE', list = 'A,B' })[ty]
                 or (ty == 'choice' and table.concat(o.choices, '|')) or (ty ~= 'flag' and 'S')
    left[i] = '  --' .. name .. (meta and (' ' .. meta) or '')
    width = math.max(width, #left[i])
  end
  left[#left + 1] = '  --help'
  for i, o in ipairs(cli.options) do
    local _, ty, d = opt_fields(o)
    local dflt = o.default_text or (ty ~= 'flag' and d ~= nil and show_default(d)) or nil
    if ty == 'path' and d == false then dflt = 'none' end
    out[#out + 1] = string.format('%-' .. width .. 's  %s%s', left[i], o.help or '',
                                  dflt and (' (default ' .. dflt .. ')') or '')
  end
  out[#out + 1] = string.format('%-' .. width .. 's  %s', left[#left], 'print this help and exit')
  if cli.footer then
    out[#out + 1] = ''
    out[#out + 1] = cli.footer
  end
  return table.concat(out, '\n')
end

function U.parseArgs(cli, args)
  local fn = 'fa.util.parseArgs'
  check_cli(fn, cli)
  if args ~= nil and type(args) ~= 'table' then E.argv(fn, 'args', 'a list of strings or nil', args) end
  local prog = cli.prog
  local byname = {}
  for _, spec in ipairs(cli.options) do byname[norm(opt_fields(spec))] = spec end
  local o = U.defaults(cli)
  local n = args and #args or 0
  for i = 1, n do -- (a number where a string belongs: the script passed arg values it made itself)
    if type(args[i]) ~= 'string' then
      return nil, string.format('%s: argument %d: expected a string (--name or a value), got %s', prog, i,
                                E.describe(args[i]))
    end
  end
  for i = 1, n do
    if args[i] == '--help' or args[i] == '-h' then
      o.help = true
      return o
    end
  end
  local i = 1
  while i <= n do
    local a = args[i]
    local name, eqv = a:match('^%-%-([%w_%-]+)=(.*)$')
    if not name then name = a:match('^%-%-([%w_%-]+)$') end
    if not name then
      return nil, string.format('%s: unexpected argument %s (options are written --name value)', prog, quote(a))
    end
    local spec = byname[norm(name)]
    if not spec then return nil, string.format('%s: unknown option --%s', prog, name) end
    local sname, ty = opt_fields(spec)
    local key = norm(sname)
    if ty == 'flag' then
      if eqv then return nil, string.format('%s: option --%s takes no value, got %s', prog, sname, quote(eqv)) end
      o[key] = true
      i = i + 1
    else
      local v = eqv
      if not v then
        v = args[i + 1]
        i = i + 1
      end
      if v == nil then return nil, string.format('%s: option --%s: expected %s, got nothing', prog, sname, expected(spec)) end
      local val, err = convert(spec, v)
      if val == nil then return nil, string.format('%s: option --%s: %s', prog, sname, err) end
      o[key] = val
      i = i + 1
    end
  end
  -- a default output path is checked too: a run must not fail at its end for want of a writable file
  for _, spec in ipairs(cli.options) do
    local sname, ty, d = opt_fields(spec)
    local key = norm(sname)
    if ty == 'path' and o[key] and o[key] == d then
      local ok, err = writable(o[key])
      if not ok then
        return nil, string.format('%s: option --%s: cannot write %s: %s', prog, sname, quote(o[key]), reason(o[key], err))
      end
    end
  end
  if cli.check then
    local err = cli.check(o)
    if err then return nil, prog .. ': ' .. err end
  end
  return o
end

-- before a run: o.threads (when given) sets the thread count; o.device 'cuda' needs a CUDA device.
-- Returns true, or nil and the message (in the words of the --device option). o is parseArgs' result, so
-- other keys (the script's own options) are allowed; threads and device are checked.
function U.setupDevice(o)
  local fn = 'fa.util.setupDevice'
  if type(o) ~= 'table' or E.isTensor(o) then E.argv(fn, 'options', 'a table of options (fa.util.parseArgs\'s result)', o) end
  if o.threads ~= nil then E.integer(fn, 'options.threads', o.threads, 1, 65536) end
  if o.device ~= nil then E.string(fn, 'options.device', o.device, { 'cpu', 'cuda' }) end
  if o.threads then fa.setNumThreads(o.threads) end
  if o.device == 'cuda' and not fa.cuda.isAvailable() then
    return nil, 'option --device: cuda needs a CUDA GPU, and none was found (this build '
                .. (fa.C.fa_has_cuda() ~= 0 and 'has CUDA kernels' or 'has no CUDA kernels: FA_CUDA=0') .. ')'
  end
  return true
end

function U.cli(cli, args)
  local o, err = U.parseArgs(cli, args)
  if o and o.help then
    print(U.help(cli))
    os.exit(0)
  end
  if o then
    local ok, derr = U.setupDevice(o)
    if not ok then o, err = nil, cli.prog .. ': ' .. derr end
  end
  if not o then
    io.stderr:write(err, '\n', U.usage(cli), '\n')
    os.exit(1)
  end
  return o
end

---------------------------------------------------------------------------- SVG plot
local function xml(s) return (tostring(s):gsub('&', '&amp;'):gsub('<', '&lt;'):gsub('>', '&gt;'):gsub('"', '&quot;')) end

-- values: a list of numbers (one per step); raw values in grey, a moving average in blue. Non-finite values
-- (and values <= 0 on the log scale) are left out of the range; they draw at the chart's edge.
function U.writePlot(path, values, opts)
  local fn = 'fa.util.writePlot'
  E.string(fn, 'path', path)
  if type(values) ~= 'table' or E.isTensor(values) or #values == 0 then
    E.argv(fn, 'values', 'a non-empty list of numbers', values)
  end
  for i = 1, #values do
    if type(values[i]) ~= 'number' then E.argv(fn, 'values[' .. i .. ']', 'a number', values[i]) end
  end
  if type(opts) == 'string' then opts = { title = opts } end
  opts = E.opts(fn, 'opts', opts, { title = true, xlabel = true, ylabel = true, log = true, average = true })
  local logscale = opts.log ~= false
  local W, Hh, ml, mr, mt, mb = 720, 400, 64, 20, 36, 48
  local n = #values
  local function finite(v) return v == v and v < math.huge and v > -math.huge and (not logscale or v > 0) end
  local avg, win, run, cnt = {}, math.max(1, math.floor(n / 40)), 0, 0
  local lo, hi = math.huge, -math.huge
  for i = 1, n do
    if finite(values[i]) then lo, hi = math.min(lo, values[i]), math.max(hi, values[i]) end
  end
  if lo > hi then lo, hi = logscale and 0.1 or 0, 1 end
  for i = 1, n do -- moving average over the finite values of the last `win` steps
    local v = values[i]
    if finite(v) then run, cnt = run + v, cnt + 1 end
    local old = values[i - win]
    if i > win and finite(old) then run, cnt = run - old, cnt - 1 end
    avg[i] = cnt > 0 and run / cnt or lo
  end
  local tr = logscale and math.log10 or function(v) return v end
  local l0, l1 = tr(lo), tr(hi)
  local pad = logscale and 0.02 or 0.02 * (l1 - l0)
  l0, l1 = l0 - pad, l1 + pad
  if logscale and l1 - l0 < 0.3 then l0, l1 = l0 - 0.15, l1 + 0.15 end
  if not logscale and l1 - l0 <= 0 then l0, l1 = l0 - 1, l1 + 1 end
  local function X(i) return ml + (W - ml - mr) * (n > 1 and (i - 1) / (n - 1) or 0) end
  local function Y(v)
    local t = finite(v) and (tr(v) - l0) / (l1 - l0) or 0
    return mt + (Hh - mt - mb) * (1 - math.max(0, math.min(t, 1)))
  end
  local out = {}
  local function add(s, ...) out[#out + 1] = string.format(s, ...) end
  add('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">', W, Hh)
  add('<rect width="100%%" height="100%%" fill="white"/>')
  add('<text x="%d" y="22" font-size="15">%s</text>', ml, xml(opts.title or 'training loss'))
  if logscale then -- grid at 1, 2, 5 times the powers of ten in range
    for e = math.floor(l0), math.ceil(l1) do
      for _, m in ipairs({ 1, 2, 5 }) do
        local v = m * 10 ^ e
        if math.log10(v) >= l0 and math.log10(v) <= l1 then
          add('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>', ml, Y(v), W - mr, Y(v))
          add('<text x="%d" y="%.1f" text-anchor="end">%g</text>', ml - 6, Y(v) + 4, v)
        end
      end
    end
  else
    for k = 0, 4 do
      local v = l0 + (l1 - l0) * k / 4
      add('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>', ml, Y(v), W - mr, Y(v))
      add('<text x="%d" y="%.1f" text-anchor="end">%.3g</text>', ml - 6, Y(v) + 4, v)
    end
  end
  for k = 0, 4 do
    local i = 1 + math.floor((n - 1) * k / 4 + 0.5)
    add('<text x="%.1f" y="%d" text-anchor="middle">%d</text>', X(i), Hh - mb + 18, i)
  end
  add('<text x="%d" y="%d" text-anchor="middle">%s</text>', (W + ml) / 2, Hh - 8, xml(opts.xlabel or 'step'))
  add('<text x="16" y="%d" transform="rotate(-90 16 %d)" text-anchor="middle">%s</text>', (Hh - mb + mt) / 2,
      (Hh - mb + mt) / 2, xml(opts.ylabel or (logscale and 'loss (log scale)' or 'loss')))
  add('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>', ml, Hh - mb, W - mr, Hh - mb)
  add('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>', ml, mt, ml, Hh - mb)
  local function line(vals, style)
    local pts = {}
    for i = 1, n do pts[i] = string.format('%.1f,%.1f', X(i), Y(vals[i])) end
    add('<polyline fill="none" %s points="%s"/>', style, table.concat(pts, ' '))
  end
  line(values, 'stroke="#bbb" stroke-width="1"')
  if opts.average ~= false then
    line(avg, 'stroke="#1f6fd0" stroke-width="2"')
    add('<text x="%d" y="%d" fill="#1f6fd0">moving average (%d steps)</text>', W - mr - 200, mt + 14, win)
  end
  add('</svg>')
  local f, err = io.open(path, 'w')
  if not f then E.fail(fn, 'cannot write %s: %s', quote(path), reason(path, err)) end
  local ok, werr = f:write(table.concat(out, '\n'), '\n')
  local cok, cerr = f:close()
  if not ok or not cok then E.fail(fn, 'cannot write %s: %s', quote(path), reason(path, werr or cerr)) end
  return path
end

return E.strictModule('fa.util', U)
