-- fa.util: typed command-line options (parseArgs, help, the CLI wrapper's exit codes) and the SVG loss plot.
local fa = require 'fastattn'
local U = fa.util

local CLI = {
  prog = 'demo.lua',
  usage = 'bin/fastattn demo.lua [options]',
  about = 'trains nothing.',
  footer = '`make nothing` runs it.',
  options = {
    { 'steps', 'int', 600, min = 1, help = 'training steps' },
    { 'every', 'int', 50, min = 0, help = 'progress period' },
    { 'level', 'int', 2, min = 1, max = 4, help = 'a level' },
    { 'lr', 'number', 2e-3, positive = true, help = 'learning rate' },
    { 'clip', 'number', 1, min = 0, help = 'clipping' },
    { 'device', 'choice', 'cpu', choices = { 'cpu', 'cuda' }, help = 'device' },
    { 'name', 'string', nil, help = 'a name' },
    { 'configs', 'list', { 'enc', 'dec' }, choices = { 'enc', 'dec', 'tri' }, help = 'configs' },
    { 'batches', 'ints', { 1, 32 }, min = 1, help = 'batch sizes' },
    { 'no-torch', 'flag', help = 'skip the peer' },
    { 'plot', 'path', false, none = true, help = 'plot file' },
    { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'threads' },
  },
}

local function parse(...) return U.parseArgs(CLI, { ... }) end
local function perr(...)
  local o, err = parse(...)
  assert.is_nil(o)
  return err
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute('mkdir -p ' .. d) == 0 or true)
  return d
end

describe('fa.util.parseArgs', function()
  it('returns the defaults, with - and _ alike in names', function()
    local o = assert(parse())
    assert.are.same({ steps = 600, every = 50, level = 2, lr = 2e-3, clip = 1, device = 'cpu',
                      configs = { 'enc', 'dec' }, batches = { 1, 32 }, no_torch = false, plot = false }, o)
    -- the defaults table is a copy: changing the result leaves the cli's default alone
    o.configs[1] = 'x'
    assert.are.same({ 'enc', 'dec' }, assert(parse()).configs)
  end)

  it('converts each type', function()
    local path = os.tmpname()
    local o = assert(parse('--steps', '7', '--every=0', '--level', '4', '--lr', '1e-4', '--clip', '0', '--device',
                           'cuda', '--name', 'x y', '--configs', 'tri,enc', '--batches', '8', '--no_torch', '--plot', path,
                           '--threads', '3'))
    os.remove(path)
    assert.are.same({ steps = 7, every = 0, level = 4, lr = 1e-4, clip = 0, device = 'cuda', name = 'x y',
                      configs = { 'tri', 'enc' }, batches = { 8 }, no_torch = true, plot = path, threads = 3 }, o)
    assert.are.equal(false, assert(parse('--plot', 'none')).plot)
    assert.are.equal(false, assert(parse('--plot', '')).plot)
    assert.are.equal(true, assert(parse('--no-torch')).no_torch)
    -- the last of a repeated option wins
    assert.are.equal(9, assert(parse('--steps', '3', '--steps', '9')).steps)
  end)

  it('rejects bad values with the option, what it expects and what it got', function()
    assert.are.equal('demo.lua: option --steps: expected a positive integer, got "abc"', perr('--steps', 'abc'))
    assert.are.equal('demo.lua: option --steps: expected a positive integer, got "0"', perr('--steps', '0'))
    assert.are.equal('demo.lua: option --steps: expected a positive integer, got "-3"', perr('--steps', '-3'))
    assert.are.equal('demo.lua: option --steps: expected a positive integer, got "2.5"', perr('--steps', '2.5'))
    assert.are.equal('demo.lua: option --steps: expected a positive integer, got "inf"', perr('--steps', 'inf'))
    assert.are.equal('demo.lua: option --every: expected a non-negative integer, got "-1"', perr('--every', '-1'))
    assert.are.equal('demo.lua: option --level: expected an integer in 1..4, got "5"', perr('--level', '5'))
    assert.are.equal('demo.lua: option --lr: expected a positive number, got "0"', perr('--lr', '0'))
    assert.are.equal('demo.lua: option --lr: expected a positive number, got "nan"', perr('--lr', 'nan'))
    assert.are.equal('demo.lua: option --lr: expected a positive number, got "inf"', perr('--lr', 'inf'))
    assert.are.equal('demo.lua: option --clip: expected a non-negative number, got "-0.5"', perr('--clip', '-0.5'))
    assert.are.equal('demo.lua: option --device: expected cpu or cuda, got "tpu"', perr('--device', 'tpu'))
    assert.are.equal('demo.lua: option --configs: expected a comma-separated list of enc, dec, tri, got "enc,foo" '
                     .. '("foo" is not one of them)', perr('--configs', 'enc,foo'))
    assert.are.equal('demo.lua: option --configs: expected a comma-separated list of enc, dec, tri, got "enc,"',
                     perr('--configs', 'enc,'))
    assert.are.equal('demo.lua: option --batches: expected a comma-separated list of positive integers, got "1,0"',
                     perr('--batches', '1,0'))
    assert.are.equal('demo.lua: option --threads: expected a positive integer, got nothing', perr('--threads'))
    assert.are.equal('demo.lua: option --no-torch takes no value, got "1"', perr('--no-torch=1'))
    assert.are.equal('demo.lua: unknown option --nope', perr('--nope', '1'))
    assert.are.equal('demo.lua: unexpected argument "12" (options are written --name value)', perr('12'))
    assert.are.equal('demo.lua: argument 1: expected a string (--name or a value), got 5', perr(5))
    assert.are.equal('demo.lua: argument 3: expected a string (--name or a value), got true', perr('--steps', '3', true))
    assert.are.equal('demo.lua: argument 2: expected a string (--name or a value), got a table', perr('--steps', {}))
  end)

  it('checks that an output path can be written, and leaves no file behind', function()
    local d = tmpdir()
    assert.are.equal('demo.lua: option --plot: cannot write "' .. d .. '/no/such/dir.svg": No such file or directory',
                     perr('--plot', d .. '/no/such/dir.svg'))
    assert.are.equal('demo.lua: option --plot: cannot write "' .. d .. '": Is a directory', perr('--plot', d))
    local o = assert(parse('--plot', d .. '/p.svg'))
    assert.are.equal(d .. '/p.svg', o.plot)
    assert.is_nil(io.open(d .. '/p.svg'), 'the check must not leave a file')
    -- an existing file is kept as it was
    local f = assert(io.open(d .. '/keep.svg', 'w')); f:write('old'); f:close()
    assert(parse('--plot', d .. '/keep.svg'))
    f = assert(io.open(d .. '/keep.svg')); assert.are.equal('old', f:read('*a')); f:close()
    os.remove(d .. '/keep.svg')
    os.remove(d)
  end)

  it('checks that an input file can be read', function()
    local cli = { prog = 'p.lua', options = { { 'compare', 'file', nil } } }
    local path = os.tmpname()
    assert.are.equal(path, assert(U.parseArgs(cli, { '--compare', path })).compare)
    os.remove(path)
    local _, err = U.parseArgs(cli, { '--compare', path })
    assert.are.equal('p.lua: option --compare: cannot read "' .. path .. '": No such file or directory', err)
    _, err = U.parseArgs(cli, { '--compare', '/' })
    assert.are.equal('p.lua: option --compare: cannot read "/": Is a directory', err)
  end)

  it('checks a default output path too, before anything runs', function()
    local cli = { prog = 'p.lua', options = { { 'plot', 'path', '/no/such/dir/x.svg', none = true } } }
    local o, err = U.parseArgs(cli, {})
    assert.is_nil(o)
    assert.are.equal('p.lua: option --plot: cannot write "/no/such/dir/x.svg": No such file or directory', err)
    assert.are.equal(false, assert(U.parseArgs(cli, { '--plot', 'none' })).plot)
  end)

  it('runs the cli check after parsing', function()
    local cli = { prog = 'p.lua', options = { { 'size', 'int', 64, min = 32 } },
                  check = function(o) if o.size % 32 ~= 0 then return 'option --size: expected a multiple of 32, got ' .. o.size end end }
    assert.are.equal(96, assert(U.parseArgs(cli, { '--size', '96' })).size)
    local _, err = U.parseArgs(cli, { '--size', '40' })
    assert.are.equal('p.lua: option --size: expected a multiple of 32, got 40', err)
  end)

  it('--help: o.help, and a help text with every option, its default and the footer', function()
    assert.is_true(assert(parse('--steps', 'abc', '--help')).help)
    assert.is_true(assert(parse('-h')).help)
    local h = U.help(CLI)
    local lines = {}
    for l in h:gmatch('[^\n]+') do lines[#lines + 1] = l end
    assert.are.equal('demo.lua: trains nothing.', lines[1])
    assert.are.equal('usage: bin/fastattn demo.lua [options]', lines[2])
    for _, want in ipairs({ '  --steps N ', 'training steps (default 600)', '  --device cpu|cuda ', 'device (default cpu)',
                            'configs (default enc,dec)', 'batch sizes (default 1,32)', 'threads (default all cores)',
                            'plot file (default none)', '  --no-torch ', '  --help ', '`make nothing` runs it.' }) do
      assert(h:find(want, 1, true), 'help lacks ' .. want .. ':\n' .. h)
    end
    assert.is_nil(h:find('skip the peer (default', 1, true), 'a flag shows no default')
    assert.are.equal('usage: bin/fastattn demo.lua [options]  (--help lists the options)', U.usage(CLI))
  end)

  it('rejects a malformed cli table with a message naming fa.util.parseArgs', function()
    local ok, err = pcall(U.parseArgs, { prog = 'p', options = { { 'x', 'integer', 1 } } }, {})
    assert.is_false(ok)
    assert.matches("fa.util.parseArgs: argument 'cli.options%[1%] type': expected 'int', 'number'", err)
    assert.matches("'path' or 'file', got \"integer\"$", err)
    ok, err = pcall(U.parseArgs, { prog = 'p', options = {}, bogus = 1 }, {})
    assert.is_false(ok)
    assert.matches("fa.util.parseArgs: argument 'cli': unknown option \"bogus\"", err)
  end)
end)

describe('fa.util.setupDevice', function()
  local function raises(pattern, ...)
    local ok, err = pcall(U.setupDevice, ...)
    assert.is_false(ok)
    assert.matches('^spec/util_spec.lua:%d+: ' .. pattern, tostring(err))
  end
  it('checks its argument before it changes anything', function()
    local before = fa.getNumThreads()
    raises("fa.util.setupDevice: argument 'options': expected a table of options %(fa.util.parseArgs's result%), got 5$", 5)
    raises("fa.util.setupDevice: argument 'options': expected a table of options %(fa.util.parseArgs's result%), got nil$")
    raises("fa.util.setupDevice: argument 'options.threads': expected an integer in 1..65536, got \"x\"$", { threads = 'x' })
    raises("fa.util.setupDevice: argument 'options.threads': expected an integer in 1..65536, got 0$", { threads = 0 })
    raises("fa.util.setupDevice: argument 'options.device': expected 'cpu' or 'cuda', got \"gpu\"$",
           { threads = 1, device = 'gpu' })
    raises('fa.util.setupDevice: argument #2: expected nothing', { threads = 1 }, true)
    assert.are.equal(before, fa.getNumThreads())
    -- parseArgs' result carries the script's own options too
    assert.is_true(U.setupDevice({ steps = 3, device = 'cpu' }))
  end)
  it('sets the thread count, and refuses cuda without a GPU', function()
    local before = fa.getNumThreads()
    assert.is_true(U.setupDevice({ threads = 1, device = 'cpu' }))
    assert.are.equal(1, fa.getNumThreads())
    fa.setNumThreads(before)
    local ok, err = U.setupDevice({ device = 'cuda' })
    if fa.cuda.isAvailable() then
      assert.is_true(ok)
    else
      assert.is_nil(ok)
      assert.matches('^option %-%-device: cuda needs a CUDA GPU, and none was found', err)
    end
  end)
end)

-- a small XML well-formedness check: balanced tags, quoted attributes, escaped text
local function assert_wellformed(svg)
  local stack, pos = {}, 1
  local ent = { amp = true, lt = true, gt = true, quot = true, apos = true }
  local function text_ok(t)
    assert(not t:find('<', 1, true), 'raw < in text: ' .. t)
    for e in t:gmatch('&([^;]*);?') do assert(ent[e], 'bad entity &' .. e) end
  end
  while true do
    local s, e, close, name, attrs, selfclose = svg:find('<(/?)([%w:_%-]+)([^<>]-)(/?)>', pos)
    if not s then
      text_ok(svg:sub(pos))
      break
    end
    text_ok(svg:sub(pos, s - 1))
    local rest = attrs:gsub('%s+[%w:_%-]+="[^"<]*"', '')
    assert(rest:match('^%s*$'), 'bad attributes in <' .. name .. attrs .. '>')
    for v in attrs:gmatch('"([^"]*)"') do text_ok(v) end
    if close == '/' then
      assert.are.equal(table.remove(stack), name)
    elseif selfclose ~= '/' then
      stack[#stack + 1] = name
    end
    pos = e + 1
  end
  assert.are.equal(0, #stack, 'unclosed tags')
end

describe('fa.util.writePlot', function()
  it('writes a well-formed SVG with one point per step', function()
    local path = os.tmpname()
    local values = { 3, 2.5, 2, 1.2, 1.1, 0.9, 0 / 0, 0.8 }
    assert.are.equal(path, U.writePlot(path, values, { title = 'loss <a & b>' }))
    local f = assert(io.open(path))
    local svg = f:read('*a')
    f:close()
    os.remove(path)
    assert.matches('^<svg xmlns="http://www.w3.org/2000/svg"', svg)
    assert_wellformed(svg)
    assert(svg:find('>loss &lt;a &amp; b&gt;</text>', 1, true), 'title escaped')
    local lines = 0
    for pts in svg:gmatch('<polyline [^>]-points="([^"]*)"') do
      lines = lines + 1
      local xs, ys = {}, {}
      for x, y in pts:gmatch('([%d%.%-]+),([%d%.%-]+)') do xs[#xs + 1], ys[#ys + 1] = tonumber(x), tonumber(y) end
      assert.are.equal(#values, #xs)
      assert.are.equal(64, xs[1])    -- left margin
      assert.are.equal(700, xs[#xs]) -- width 720 - right margin 20
      for i = 2, #xs do assert(xs[i] > xs[i - 1]) end
      for _, y in ipairs(ys) do assert(y >= 36 and y <= 352, 'y inside the plot area: ' .. y) end
      if lines == 1 then
        -- raw values: the largest is highest (smallest y); falling values fall
        assert(ys[1] < ys[2] and ys[2] < ys[3] and ys[5] < ys[6])
      end
    end
    assert.are.equal(2, lines) -- raw values and the moving average
  end)

  it('a linear scale and no average on request; a title as a string', function()
    local path = os.tmpname()
    U.writePlot(path, { -1, 0, 1 }, { log = false, average = false, ylabel = 'value' })
    local f = assert(io.open(path)); local svg = f:read('*a'); f:close()
    assert_wellformed(svg)
    local n = 0
    for _ in svg:gmatch('<polyline') do n = n + 1 end
    assert.are.equal(1, n)
    assert(svg:find('>value</text>', 1, true))
    U.writePlot(path, { 1 }, 'one step')
    f = assert(io.open(path)); svg = f:read('*a'); f:close()
    os.remove(path)
    assert_wellformed(svg)
    assert(svg:find('>one step</text>', 1, true))
  end)

  it('a path it cannot write: a clear error at the caller\'s line', function()
    local ok, err = pcall(U.writePlot, '/no/such/dir/loss.svg', { 1, 2 })
    assert.is_false(ok)
    assert.matches('fa%.util%.writePlot: cannot write "/no/such/dir/loss%.svg": No such file or directory$', err)
    assert.is_nil(err:find('lua/fastattn/', 1, true), 'no library position: ' .. err)
    ok, err = pcall(U.writePlot, '/dev/full', { 1, 2 })
    assert.is_false(ok)
    assert.matches('fa%.util%.writePlot: cannot write "/dev/full": No space left on device$', err)
  end)

  it('rejects bad arguments', function()
    local function e(...)
      local ok, err = pcall(U.writePlot, ...)
      assert.is_false(ok)
      return err
    end
    assert.matches("fa.util.writePlot: argument 'path': expected a string, got nil", e(nil, { 1 }))
    assert.matches("fa.util.writePlot: argument 'values': expected a non%-empty list of numbers, got a table", e('x', {}))
    assert.matches("fa.util.writePlot: argument 'values%[2%]': expected a number, got \"a\"", e('x', { 1, 'a' }))
    assert.matches("fa.util.writePlot: argument 'opts': unknown option \"colour\"", e('x', { 1 }, { colour = 1 }))
  end)
end)
