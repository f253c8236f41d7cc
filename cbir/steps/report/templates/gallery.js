(function () {
  var lo = document.getElementById('lo'), hi = document.getElementById('hi');
  var ex = document.getElementById('exact'), shown = document.getElementById('shown');
  var cards = document.querySelectorAll('[data-score]');
  var q = {};
  location.hash.slice(1).split('&').forEach(function (kv) {
    var p = kv.split('='); if (p[0]) q[p[0]] = decodeURIComponent(p[1] || '');
  });
  if (q.lo) lo.value = q.lo;
  if (q.hi) hi.value = q.hi;
  if (ex && q.exact === '0') ex.checked = false;
  function apply() {
    var a = parseFloat(lo.value), b = parseFloat(hi.value), n = 0;
    for (var i = 0; i < cards.length; i++) {
      var c = cards[i], s = parseFloat(c.getAttribute('data-score'));
      var kind = c.getAttribute('data-kind');
      var ok = !(s < a) && !(s > b) && (!ex || ex.checked || kind !== 'exact');
      c.hidden = !ok; if (ok) n++;
    }
    shown.textContent = n;
    var frag = 'lo=' + encodeURIComponent(lo.value) + '&hi=' + encodeURIComponent(hi.value) +
               (ex && !ex.checked ? '&exact=0' : '');
    var links = document.querySelectorAll('a.page');
    for (var j = 0; j < links.length; j++) {
      var l = links[j], top = parseFloat(l.getAttribute('data-hi')),
          bottom = parseFloat(l.getAttribute('data-lo'));
      l.href = l.getAttribute('href').split('#')[0] + '#' + frag;
      l.className = (bottom > b || top < a) ? 'page off' : 'page';
    }
  }
  lo.addEventListener('input', apply); hi.addEventListener('input', apply);
  if (ex) ex.addEventListener('change', apply);
  apply();
})();
