-- examples/train_deform2d.lua in a short run: the DAT-style classifier (conv stem, nn.DeformableAttention2D blocks
-- with grouped-query attention) trains on its synthetic images and its loss falls; its data, options, make target
-- and the two SVG files.
local fa = require 'fastattn'
local H = require 'helpers.check'

local function load_example() return H.load_example('examples/train_deform2d.lua') end

describe('examples/train_deform2d.lua', function()
  it('the loss falls in a short run (two blocks, GQA 4 over 2)', function()
    local ex = load_example()
    local _, _, losses = H.assert_short_run(ex, { '--steps', '200', '--every', '0', '--plot', 'none', '--grid', 'none' },
                                            { eval = 100, held = 0.85, window = 20, train = 0.85 })
    assert.are.equal(200, #losses)
  end)

  it('draws a cross and a square per image, the label saying whether the cross is left of it', function()
    local ex = load_example()
    math.randomseed(3)
    fa.manualSeed(3)
    local x, t = ex.makeBatch(40, 32, 0)
    assert.are.same({ 40, 1, 32, 32 }, x:size())
    local labels = t.label:table()
    local seen = {}
    for i = 1, 40 do
      local cross, square = t.boxes[i][1], t.boxes[i][2]
      assert.are.equal(cross[2] < square[2] and 2 or 1, labels[i])
      seen[labels[i]] = true
      local img = x:select(1, i):select(1, 1)
      -- no noise: the square's 49 pixels and the cross's 13 are lit (7 px shapes at size 32), nothing else
      local lit = 0
      for r = 1, 32 do for c = 1, 32 do if img:get(r, c) > 0 then lit = lit + 1 end end end
      assert.are.equal(49 + 13, lit)
      assert(img:get(square[1] + 1, square[2] + 1) > 0.7, 'the square\'s corner is lit')
      assert.are.equal(0, img:get(cross[1] + 1, cross[2] + 1)) -- the cross's corner is not
      assert(img:get(cross[1] + 4, cross[2] + 1) > 0.7, 'the cross\'s arm is lit')
    end
    assert.is_true(seen[1] and seen[2])
  end)

  it('rejects bad options (parseArgs: nil and the message)', function()
    local ex = load_example()
    local function e(...) return H.arg_error(ex, ...) end
    assert.are.equal('train_deform2d.lua: option --device: expected cpu or cuda, got "tpu"', e('--device', 'tpu'))
    assert.are.equal('train_deform2d.lua: option --steps: expected a positive integer, got "abc"', e('--steps', 'abc'))
    assert.are.equal('train_deform2d.lua: option --size: expected a multiple of 8, got 36', e('--size', '36'))
    assert.are.equal('train_deform2d.lua: option --dim: expected a multiple of 4 and of --heads (4), got 18',
                     e('--dim', '18'))
    assert.are.equal('train_deform2d.lua: option --kv_heads: expected a divisor of --heads (4) and of --dim (32), got 3',
                     e('--kv_heads', '3'))
    assert.are.equal('train_deform2d.lua: unknown option --nope', e('--nope', '1'))
    local o = assert(ex.parseArgs({}))
    assert.are.same({ 1200, 32, 32, 'cpu', 2, 32, 4, 2 }, { o.steps, o.batch, o.size, o.device, o.blocks, o.dim, o.heads,
                                                            o.kv_heads })
  end)

  it('writes the loss curve and the sampling grid over an image (SVG)', function()
    local ex = load_example()
    math.randomseed(5)
    fa.manualSeed(5)
    local o = assert(ex.parseArgs({ '--blocks', '1', '--dim', '16' }))
    local model = ex.makeModel(o)
    local x = ex.makeBatch(1, 32, 0.2)
    local path = os.tmpname()
    ex.writeGrid(path, model, x, 'a <title>')
    local svg = H.read_svg(path)
    assert.truthy(svg:find('a &lt;title&gt;', 1, true))
    local _, rects = svg:gsub('<rect ', '')
    local _, lines = svg:gsub('<line ', '')
    assert.are.equal(32 * 32, rects)
    assert.are.equal(2 * 4 * 4, lines) -- 2 offset groups x 4x4 keys
    fa.util.writePlot(path, { 1, 0.5, 0.25 }, 'loss')
    H.assert_plot(path)
  end)

  it('on the command line: --help, bad options refused (exit code 1), and the make target', function()
    H.assert_example_cli('examples/train_deform2d.lua', 'demo-deform2d', '^train_deform2d%.lua: trains a small DAT%-style '
                         .. 'classifier', { '--kv_heads N', '--grid FILE' })
  end)
end)
