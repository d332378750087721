-- Runs the README's example so that the README stays true.
describe('README example', function()
  it('runs and fits its batch', function()
    local f = assert(io.open('README.md'))
    local text = f:read('*a')
    f:close()
    local code = assert(text:match('```lua\n(.-)```'), 'no lua block in README.md')
    local printed = {}
    local env = setmetatable({ print = function(...) printed[#printed + 1] = { ... } end }, { __index = _G })
    local chunk = assert(loadstring(code, 'README'))
    setfenv(chunk, env)
    chunk()
    local loss = printed[#printed][2]
    assert.is_true(type(loss) == 'number' and loss < 0.05, 'final loss ' .. tostring(loss))
  end)
end)
