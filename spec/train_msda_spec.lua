-- examples/train_msda.lua in a short run: the Deformable-DETR-style model (conv backbone, 4 levels, an
-- nn.MSDeformAttn encoder layer, per-cell heads) trains on its synthetic disc images and its loss falls.
local fa = require 'fastattn'
local H = require 'helpers.check'

local function load_example() return H.load_example('examples/train_msda.lua') end

-- runs `bin/fastattn examples/train_msda.lua <args>`: its output (stdout and stderr) and exit code
local function run(args) return H.run_script('examples/train_msda.lua', args) end

describe('examples/train_msda.lua', function()
  it('the loss falls in a short run (size 32: levels 8x8, 4x4, 2x2, 1x1)', function()
    local ex = load_example()
    local _, _, losses = H.assert_short_run(ex, { '--size', '32', '--steps', '80', '--batch', '16', '--lr', '3e-3',
      '--every', '0', '--d_model', '16', '--heads', '2', '--points', '2', '--plot', 'none' },
      { eval = 64, held = 0.6, window = 10, train = 0.7 })
    assert.are.equal(80, #losses)
  end)

  it('makes discs of the requested radius range', function()
    local ex = load_example()
    math.randomseed(3); fa.manualSeed(3)
    local x, t = ex.makeBatch(50, 64, 0)
    assert.are.same({ 50, 1, 64, 64 }, x:size())
    for i = 1, 50 do
      assert(t.r[i] >= 1 and t.r[i] <= 12, 'radius ' .. t.r[i])
      assert(t.cls[i] >= 1 and t.cls[i] <= 3)
      -- the disc is bright at its centre pixel and the background is 0 (no noise asked)
      local c = x:get(i, 1, math.floor(t.cy[i]) + 1, math.floor(t.cx[i]) + 1)
      assert(c > 0.3, 'centre pixel ' .. c)
    end
  end)

  it('rejects bad options (parseArgs: nil and the message)', function()
    local ex = load_example()
    local function e(...) local o, err = ex.parseArgs({ ... }); assert.is_nil(o); return err end
    assert.are.equal('train_msda.lua: option --size: expected a multiple of 32 (4 levels, stride 32), got 40',
                     e('--size', '40'))
    assert.are.equal('train_msda.lua: option --device: expected cpu or cuda, got "tpu"', e('--device', 'tpu'))
    assert.are.equal('train_msda.lua: option --steps: expected a positive integer, got "abc"', e('--steps', 'abc'))
    assert.are.equal('train_msda.lua: option --batch: expected a positive integer, got "0"', e('--batch', '0'))
    assert.are.equal('train_msda.lua: option --test: expected a positive integer, got "-5"', e('--test', '-5'))
    assert.are.equal('train_msda.lua: option --layers: expected a positive integer, got "1.5"', e('--layers', '1.5'))
    assert.are.equal('train_msda.lua: option --d_model: expected a multiple of 4 and of --heads (4), got 30',
                     e('--d_model', '30'))
    assert.are.equal('train_msda.lua: unknown option --nope', e('--nope', '1'))
    assert.are.equal('train_msda.lua: option --plot: cannot write "/no/such/dir/loss.svg": No such file or directory',
                     e('--plot', '/no/such/dir/loss.svg'))
    -- the defaults are the documented ones
    local o = assert(ex.parseArgs({}))
    assert.are.same({ 600, 24, 2e-3, 64, 'cpu', 1 }, { o.steps, o.batch, o.lr, o.size, o.device, o.layers })
  end)

  it('on the command line: --help, and bad options refused before training (message, usage, exit code 1)', function()
    local out, code = run('--help')
    assert.are.equal(0, code)
    assert.matches('^train_msda%.lua: trains a small Deformable%-DETR%-style model', out)
    for _, want in ipairs({ 'usage: bin/fastattn examples/train_msda.lua [options]', '--steps N', '(default 600)',
                            '--device cpu|cuda', '--plot FILE', '`make demo` runs it' }) do
      assert(out:find(want, 1, true), 'help lacks ' .. want .. ':\n' .. out)
    end
    out, code = run('--steps abc')
    assert.are.equal(1, code)
    assert.are.equal('train_msda.lua: option --steps: expected a positive integer, got "abc"\n' ..
                     'usage: bin/fastattn examples/train_msda.lua [options]  (--help lists the options)\n', out)
    out, code = run('--batch 0 --steps 1')
    assert.are.equal(1, code)
    assert.matches('^train_msda%.lua: option %-%-batch: expected a positive integer, got "0"\n', out)
    out, code = run('--steps 2 --plot /no/such/dir/loss.svg')
    assert.are.equal(1, code)
    assert.matches('^train_msda%.lua: option %-%-plot: cannot write "/no/such/dir/loss%.svg": No such file or directory\n', out)
    if not fa.cuda.isAvailable() then
      out, code = run('--device cuda')
      assert.are.equal(1, code)
      assert.matches('^train_msda%.lua: option %-%-device: cuda needs a CUDA GPU, and none was found', out)
    end
  end)

  it('a tiny run writes its loss curve; its header and `make demo` name each other', function()
    local path = os.tmpname()
    local out, code = run('--steps 2 --batch 2 --size 32 --test 4 --every 1 --d_model 8 --heads 2 --points 1 --plot ' .. path)
    assert.are.equal(0, code, out)
    assert(out:find('step     2/2', 1, true), out)
    assert(out:find('loss curve written to ' .. path, 1, true), out)
    H.assert_plot(path)
    H.assert_demo_target('demo', 'examples/train_msda.lua')
  end)
end)

describe('examples/train_msda.lua on the GPU #gpu', function()
  if fa.C.fa_cuda_device_count() < 1 then
    it('skips: no CUDA device found', function() pending('no CUDA device found') end)
    return
  end
  it('the loss falls in a short run with --device cuda', function()
    local ex = load_example()
    local model = H.assert_short_run(ex, { '--size', '64', '--steps', '80', '--batch', '32', '--lr', '3e-3',
      '--every', '0', '--device', 'cuda', '--plot', 'none' }, { eval = 64, held = 0.6, cuda = true })
    assert.are.equal('cuda:0', model.head.weight:device())
  end)
end)
