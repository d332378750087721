-- examples/train_triangle.lua in a short run: the pair model with triangle attention (nn.TriangleAttention,
-- starting and ending node, a transition) trains on its synthetic chains and its loss falls.
local fa = require 'fastattn'
local H = require 'helpers.check'

local function load_example() return H.load_example('examples/train_triangle.lua') end

-- runs `bin/fastattn examples/train_triangle.lua <args>`: its output (stdout and stderr) and exit code
local function run(args) return H.run_script('examples/train_triangle.lua', args) end

describe('examples/train_triangle.lua', function()
  it('the loss falls in a short run (n 8, one block)', function()
    local ex = load_example()
    local _, _, losses = H.assert_short_run(ex, { '--n', '8', '--steps', '40', '--batch', '8', '--every', '0',
      '--blocks', '1', '--c_z', '16', '--heads', '2', '--c_hidden', '4', '--plot', 'none' },
      { eval = 32, held = 0.5, window = 5, train = 0.5 })
    assert.are.equal(40, #losses)
  end)

  it('makes chains of unit steps, padded, with the seen pairs marked', function()
    local ex = load_example()
    math.randomseed(3)
    local b = ex.makeBatch(20, 12, 0.3, 0)
    assert.are.same({ 20, 12, 12, 6 }, b.feat:size())
    for s = 1, 20 do
      local L = b.lengths[s]
      assert(L >= 6 and L <= 12, 'length ' .. L)
      for i = 1, 12 do
        for j = 1, 12 do
          local real = i <= L and j <= L
          assert.are.equal(real and 1 or 0, b.mask:get(s, i, j))
          local d = b.dist:get(s, i, j)
          assert.are.equal(d, b.dist:get(s, j, i))
          if real and math.abs(i - j) == 1 then
            assert(math.abs(d - 1) < 1e-12, 'a bond of length ' .. d) -- unit steps
            assert.are.equal(1, b.feat:get(s, i, j, 1))             -- bonds are always seen
            assert(math.abs(b.feat:get(s, i, j, 2) - d) < 1e-12)    -- no noise asked
          end
          if real and i ~= j then
            assert(d <= math.abs(i - j) + 1e-12, 'a walk of unit steps')
            assert.are.equal(1 - b.feat:get(s, i, j, 1), b.unseen:get(s, i, j))
          else
            assert.are.equal(0, b.w:get(s, i, j))
          end
        end
      end
    end
  end)

  it('rejects bad options (parseArgs: nil and the message)', function()
    local ex = load_example()
    local function e(...) local o, err = ex.parseArgs({ ... }); assert.is_nil(o); return err end
    assert.are.equal('train_triangle.lua: option --device: expected cpu or cuda, got "tpu"', e('--device', 'tpu'))
    assert.are.equal('train_triangle.lua: option --steps: expected a positive integer, got "abc"', e('--steps', 'abc'))
    assert.are.equal('train_triangle.lua: option --batch: expected a positive integer, got "0"', e('--batch', '0'))
    assert.are.equal('train_triangle.lua: option --blocks: expected a positive integer, got "1.5"', e('--blocks', '1.5'))
    assert.matches('^train_triangle%.lua: option %-%-n: expected an integer >= 4, got "3"', e('--n', '3'))
    assert.matches('^train_triangle%.lua: option %-%-obs: expected a number .*1.*got "1%.5"', e('--obs', '1.5'))
    assert.are.equal('train_triangle.lua: unknown option --nope', e('--nope', '1'))
    assert.are.equal('train_triangle.lua: option --plot: cannot write "/no/such/dir/loss.svg": No such file or directory',
                     e('--plot', '/no/such/dir/loss.svg'))
    local o = assert(ex.parseArgs({}))
    assert.are.same({ 300, 16, 3e-3, 16, 'cpu', 2, false }, { o.steps, o.batch, o.lr, o.n, o.device, o.blocks, o.no_baseline })
  end)

  it('on the command line: --help, and bad options refused before training (message, usage, exit code 1)', function()
    local out, code = run('--help')
    assert.are.equal(0, code)
    assert.matches('^train_triangle%.lua: trains a small pair model with triangle attention', out)
    for _, want in ipairs({ 'usage: bin/fastattn examples/train_triangle.lua [options]', '--steps N', '(default 300)',
                            '--device cpu|cuda', '--plot FILE', '--no_baseline', '`make demo-triangle` runs it' }) do
      assert(out:find(want, 1, true), 'help lacks ' .. want .. ':\n' .. out)
    end
    out, code = run('--steps abc')
    assert.are.equal(1, code)
    assert.are.equal('train_triangle.lua: option --steps: expected a positive integer, got "abc"\n' ..
                     'usage: bin/fastattn examples/train_triangle.lua [options]  (--help lists the options)\n', out)
    if not fa.cuda.isAvailable() then
      out, code = run('--device cuda')
      assert.are.equal(1, code)
      assert.matches('^train_triangle%.lua: option %-%-device: cuda needs a CUDA GPU, and none was found', out)
    end
  end)

  it('a tiny run prints both models\' metric and writes its loss curve; its header and `make demo-triangle` name each other', function()
    local path = os.tmpname()
    local out, code = run('--steps 2 --batch 2 --n 6 --test 4 --every 1 --blocks 1 --c_z 8 --heads 2 --c_hidden 2 ' ..
                          '--threads 1 --plot ' .. path)
    assert.are.equal(0, code, out)
    assert(out:find('step     2/2', 1, true), out)
    assert(out:find('baseline step     2/2', 1, true), out)
    assert(out:find('held%-out %(4 chains%) triangle model: +RMSE of the unseen distances %d'), out)
    assert(out:find('held%-out %(4 chains%) baseline: +RMSE of the unseen distances %d'), out)
    assert(out:find('loss curve written to ' .. path, 1, true), out)
    H.assert_plot(path)
    H.assert_demo_target('demo-triangle', 'examples/train_triangle.lua')
  end)
end)

describe('examples/train_triangle.lua on the GPU #gpu', function()
  if fa.C.fa_cuda_device_count() < 1 then
    it('skips: no CUDA device found', function() pending('no CUDA device found') end)
    return
  end
  it('the loss falls in a short run with --device cuda (n 32)', function()
    local ex = load_example()
    local model = H.assert_short_run(ex, { '--n', '32', '--steps', '60', '--batch', '16', '--every', '0',
      '--device', 'cuda', '--plot', 'none' }, { eval = 32, held = 0.5, cuda = true })
    assert.are.equal('cuda:0', model.embed.weight:device())
  end)
end)
