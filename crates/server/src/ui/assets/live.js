// Live refresh for pages marked data-live: fetch the same page every few
// seconds and swap its main content. Without scripts the page is complete,
// just not live. A failed fetch (the node is down) keeps the last content
// and says so.
(function () {
  "use strict";
  var main = document.getElementById("content");
  if (!main || !main.dataset.live) { return; }
  var every = Math.max(2, parseInt(main.dataset.live, 10) || 5) * 1000;
  var stale = document.createElement("p");
  stale.className = "error";
  stale.id = "stale";
  function refresh() {
    // Not while the page is hidden, or while someone is on one of its
    // controls (a refresh would replace the button under the pointer).
    if (document.hidden) { return; }
    var active = document.activeElement;
    if (active && active !== document.body && main.contains(active)) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("status " + r.status); }
        return r.text();
      })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html").getElementById("content");
        if (next) { main.innerHTML = next.innerHTML; }
      })
      .catch(function (e) {
        stale.textContent = "Live refresh failed (" + e.message + "); showing the last answer.";
        if (!document.getElementById("stale")) { main.prepend(stale); }
      });
  }
  window.setInterval(refresh, every);
})();
